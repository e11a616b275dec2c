"""SEWL, the self-evolving weight layer: a graft adapter whose r×r Φ keeps learning from the text the model reads,
so the model carries memory and personalisation in a few small matrices instead of replaying old tokens.

    sewl = SEWL(peft_model, SEWLConfig(rule="fisher", lr=..., last_k=4), tokenizer=tok)
    loss = sewl.step(batch)          # scores the chunk first, then learns it (rails permitting)
    sewl.save("state/alice")         # a graft adapter folder PEFT loads, plus the SEWL state
    sewl = SEWL.load(peft_model, "state/alice")

Modules: `config` (SEWLConfig), `signal` (g = ∂L/∂Φ from hooks), `rules` (the five merge rules), `rails` (clip,
rejections, ageing, log), `state`, `engine` (SEWL), `snapshot` (save/verify/restore), `users` (per-user states and
persona blending).
"""

from .config import SEWLConfig
from .engine import SEWL
from .rails import UpdateRecord
from .state import SEWLState, SiteState
from .users import SEWLUsers, blend_states


__all__ = ["SEWL", "SEWLConfig", "SEWLState", "SEWLUsers", "SiteState", "UpdateRecord", "blend_states"]

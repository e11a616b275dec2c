"""Run in a fresh process by test_snapshot: resume a saved SEWL on a freshly built model, learn the remaining batches,
write the final Φ of every selected graft to a safetensors file."""

import sys

from safetensors.torch import save_file
from sewl_models import grafted, token_batch

from peft_graft.sewl import SEWL


def main(snapshot: str, out: str, first: int, last: int) -> None:
    sewl = SEWL.load(grafted(), snapshot)
    for seed in range(first, last):
        sewl.step(token_batch(seed))
    save_file({name: site.phi.contiguous() for name, site in sewl.state.sites.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

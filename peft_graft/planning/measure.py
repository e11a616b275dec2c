"""What a real forward pass keeps alive for backward: the measurement the activation formulas are checked against.

Peak process memory on a CPU mixes allocator caches, the Python heap and the model itself; what an activation formula
predicts is narrower and exact: the tensors autograd holds between forward and backward. They are found by walking the
graph from the loss: every built-in node exposes what it saved (``_saved_*``), and a custom `autograd.Function`
(bitsandbytes' 4-bit matmul) keeps tensors on its context, which is read too. Tensors that are a model's own parameters
or buffers are not activations and are left out; views of one storage count once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def saved_activation_bytes(output: torch.Tensor, model: nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd saved to compute the gradients of ``output`` (a loss), less those of
    ``model``'s parameters and buffers."""
    owned = set() if model is None else {t.untyped_storage().data_ptr() for t in _model_tensors(model)}
    seen: dict[int, int] = {}
    for tensor in _saved_tensors(output.grad_fn):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():  # bitsandbytes keeps quantization statistics outside parameters and buffers
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            yield from (v for v in vars(state).values() if isinstance(v, torch.Tensor))


def _saved_tensors(root: torch.autograd.graph.Node | None) -> Iterator[torch.Tensor]:
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        for name in dir(node):
            if name.startswith("_saved_"):
                yield from _tensors(getattr(node, name))
        if hasattr(node, "saved_tensors"):  # a custom Function's context: save_for_backward and plain attributes
            yield from _tensors(node.saved_tensors)
            yield from _tensors(tuple(vars(node).values()) if hasattr(node, "__dict__") else ())


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)

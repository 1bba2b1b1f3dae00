"""The non-finite guards: what counts as non-finite, ZeRO-3's padding, and the step veto."""
import torch

from internimage.pretrain import guards
from internimage.pretrain.guards import StepGate, tensors_finite, unpadded


def test_only_nan_and_inf_are_non_finite_however_large_the_values():
    assert bool(tensors_finite([torch.full((5,), 3e38), torch.zeros(0), torch.ones(3, 2)]))
    assert not bool(tensors_finite([torch.ones(4), torch.tensor([1.0, float("nan")])]))
    assert not bool(tensors_finite([torch.tensor([float("-inf")], dtype=torch.bfloat16)]))


class _Partitioned(torch.nn.Parameter):
    """A stand-in ZeRO-3 parameter: only ``ds_numel`` (its full element count) matters here."""


def test_the_padding_of_the_last_zero3_partition_is_not_part_of_the_weights(monkeypatch):
    # 9 elements over 2 ranks: partitions of 5, the last one's fifth element never written.
    param = _Partitioned(torch.zeros(1))
    param.ds_numel = 9
    garbage = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    monkeypatch.setattr(guards, "rank", lambda: 1)
    assert unpadded(param, garbage).tolist() == [1.0, 2.0, 3.0, 4.0]
    monkeypatch.setattr(guards, "rank", lambda: 0)
    assert unpadded(param, garbage).numel() == 5
    assert unpadded(torch.nn.Parameter(torch.ones(3)), torch.ones(3)).numel() == 3  # not partitioned


def test_a_closed_gate_leaves_weights_and_optimizer_state_untouched():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    gate = StepGate(optimizer)
    weight.grad = torch.ones(3)
    optimizer.step()
    after_one = (weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()})
    gate.closed = True
    weight.grad = torch.full((3,), float("inf"))
    optimizer.step()
    assert torch.equal(weight.detach(), after_one[0]) and gate.vetoed_calls == 1
    assert all(torch.equal(optimizer.state[weight][k], v) for k, v in after_one[1].items())
    gate.closed = False
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(weight.detach(), after_one[0])

"""Scores for federated updates (plugins/dvm_federate/scoring.py), on real digits updates: five
providers train the same global model on their shards with plain SGD; then one of them cheats in
each way the checkable-training issue names. Each cheat scores at or below zero and is left
out; the honest updates are kept, and the merge of what is kept is within one point of the
honest-only merge."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from safetensors.torch import save_file  # noqa: E402

from dvm_federate.scoring import LossOn, fedavg, score_updates  # noqa: E402
from dvm_image_classifier.digits import digits_split  # noqa: E402
from dvm_image_classifier.models import build_model, make_spec  # noqa: E402

PROVIDERS = [f"{c * 64}" for c in "abcde"]


def _tensors(x: np.ndarray, y: np.ndarray, mean: float, std: float):
    return ((torch.tensor(x, dtype=torch.float32)[:, None] / 255.0 - mean) / std), torch.tensor(y)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """(directory, global weights path, honest update paths, held-out loss, build, test set)."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits_split(0)
    mean, std = float(x_train.mean() / 255.0), float(x_train.std() / 255.0)
    spec = make_spec("auto", 1, 10, 8, 8)
    build = lambda: build_model(spec)   # noqa: E731
    directory = tmp_path_factory.mktemp("scores")
    model = build()
    # The global model of a later round: one epoch on everything, so updates are small steps.
    xs, ys = _tensors(x_train, y_train, mean, std)
    _sgd(model, xs, ys, epochs=1, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(base, str(directory / "global.safetensors"))
    shards = np.array_split(np.random.default_rng(0).permutation(len(x_train)), 5)
    paths = []
    for i, shard in enumerate(shards):
        model.load_state_dict(base)
        _sgd(model, xs[shard], ys[shard], epochs=2, seed=i + 1)
        paths.append(directory / f"honest-{i}.safetensors")
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(paths[-1]))
    heldout = LossOn(build, *_tensors(x_test, y_test, mean, std))
    return directory, directory / "global.safetensors", paths, heldout, build, _tensors(x_test, y_test, mean, std)


def _sgd(model, x, y, *, epochs: int, seed: int) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


def _cheat(directory, base_path, honest_path, how: str, other_path=None):
    from safetensors.torch import load_file

    base, update = load_file(str(base_path)), load_file(str(honest_path))
    generator = torch.Generator().manual_seed(3)
    out = {}
    for key, value in update.items():
        if not value.is_floating_point():
            out[key] = value
        elif how == "lazy":
            out[key] = base[key].clone()
        elif how == "noise":
            out[key] = base[key] + torch.randn(value.shape, generator=generator) * (value - base[key]).std() * 10
        elif how == "signflip":
            out[key] = base[key] - (value - base[key]) * 4
        elif how == "scaled":
            out[key] = base[key] + (value - base[key]) * 10
        else:
            raise AssertionError(how)
    path = directory / f"{how}.safetensors"
    save_file(out, str(path))
    return path


def _accuracy(build, state, test) -> float:
    model = build().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return float((model(test[0]).argmax(1) == test[1]).float().mean())


@pytest.mark.parametrize("how", ["lazy", "noise", "signflip", "scaled", "copy"])
def test_each_bad_update_is_scored_out_and_the_honest_ones_kept(federation, how):
    from safetensors.torch import load_file

    directory, base_path, honest, heldout, build, test = federation
    cheater = 4
    bad = honest[0] if how == "copy" else _cheat(directory, base_path, honest[cheater], how)
    paths = honest[:cheater] + [bad]
    scores = score_updates(base_path, paths, PROVIDERS, [1.0] * 5, heldout)
    print({s.provider[:1]: (round(s.score, 4), s.merged, s.reason) for s in scores})
    assert [s.provider for s in scores] == PROVIDERS
    assert scores[cheater].score <= 0 and not scores[cheater].merged, scores[cheater]
    assert all(s.merged and s.score > -0.2 * s.heldout_with for s in scores[:cheater]), scores
    if how in ("lazy", "copy"):
        assert scores[cheater].score == 0
        assert ("lazy" if how == "lazy" else "a copy of the update of aaaa") in scores[cheater].reason
    else:
        assert "raised the held-out loss" in scores[cheater].reason
    # The merge of what was kept, against the merge of the honest ones alone.
    base = load_file(str(base_path))
    kept = [load_file(str(p)) for p, s in zip(paths, scores) if s.merged]
    honest_only = [load_file(str(p)) for p in honest[:cheater]]
    merged = _accuracy(build, fedavg(base, kept, [1.0] * len(kept)), test)
    reference = _accuracy(build, fedavg(base, honest_only, [1.0] * len(honest_only)), test)
    assert merged >= reference - 0.01, (merged, reference)
    # Without scoring, plain averaging with the cheat in (except a lazy update or a copy, which
    # only dilute or double-count) is worse: the scores are what keeps the model.
    everything = [load_file(str(p)) for p in paths]
    if how in ("noise", "signflip", "scaled"):
        assert heldout(fedavg(base, everything, [1.0] * 5)) > heldout(fedavg(base, kept, [1.0] * len(kept)))


def test_honest_updates_are_all_kept_and_scored_on_their_shards(federation):
    directory, base_path, honest, heldout, build, test = federation
    seen = []

    def shard_loss(i, state):
        seen.append(i)
        return heldout(state)   # a stand-in shard: the call order and the report are what is checked

    scores = score_updates(base_path, honest, PROVIDERS, [1.0] * 5, heldout, shard_loss)
    assert all(s.merged for s in scores), scores
    assert sorted(set(seen)) == [0, 1, 2, 3, 4]
    assert all(s.shard_before is not None and s.shard_after < s.shard_before for s in scores)


def test_an_update_that_does_not_fit_or_holds_nan_is_left_out_with_its_reason(federation, tmp_path):
    from safetensors.torch import load_file

    directory, base_path, honest, heldout, build, test = federation
    update = load_file(str(honest[1]))
    key = next(k for k, v in update.items() if v.is_floating_point())
    nan = dict(update, **{key: torch.full_like(update[key], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"))
    wrong = {k: v for k, v in update.items() if k != key}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    scores = score_updates(base_path, [honest[0], tmp_path / "nan.safetensors", tmp_path / "wrong.safetensors"],
                           PROVIDERS[:3], [1.0] * 3, heldout)
    assert [s.merged for s in scores] == [True, False, False]
    assert "NaN" in scores[1].reason and "do not fit" in scores[2].reason

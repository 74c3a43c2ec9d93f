"""Streaming shards (multimoe.data.pack, multimoe.data.shards): packed real samples decode to exactly the
manifest's samples; training streams them shuffled, split over ranks, and resumes mid-epoch exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multimoe.data.dataset import ManifestDataset
from multimoe.data.manifest import read_manifest
from multimoe.data.pack import main as pack_main
from multimoe.data.shards import SampleDecoder, ShardError, read_meta, streaming_dataset
from multimoe.tokenizer import WordTokenizer
from tests.probes import finish, fit_command, kill_when_paused, losses, same_weights, start
from tests.test_finetune import tiny_config


@pytest.fixture(scope="module")
def shards(digit_manifests: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    pack_main([str(digit_manifests["train"]), str(out), "--chunk-bytes", "100KB"])
    return out


def test_packed_samples_are_the_manifest_samples(digit_manifests: dict[str, Path], shards: Path) -> None:
    config = tiny_config()
    meta = read_meta(str(shards))
    rows = read_manifest(digit_manifests["train"])
    words = WordTokenizer.build([t for r in rows for t in [r.text or "", *r.captions]])
    assert meta["samples"] == len(rows) and words.vocab[4:] == meta["words"]
    assert len(json.loads((shards / "index.json").read_text())["chunks"]) > 1  # several chunks
    manifest = ManifestDataset.for_model(rows, config, meta["labels"], words)
    expected = {s.id: s for s in (manifest[i] for i in range(len(manifest))) if s is not None}
    decoder = SampleDecoder.for_model(str(shards), config, meta["labels"], words)
    seen = []
    for sample in streaming_dataset(str(shards), decoder, shuffle=False, seed=0):
        want = expected[sample.id]
        assert (sample.text, sample.label, sample.caption_ids) == (want.text, want.label, want.caption_ids)
        for got, ref in ((sample.pixels, want.pixels), (sample.waveform, want.waveform)):
            assert (got is None and ref is None) or torch.equal(got, ref), sample.id
        seen.append(sample.id)
    assert sorted(seen) == sorted(expected)


def test_shuffled_epochs_and_ranks_split_the_samples(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config()
    meta = read_meta(str(shards))
    decoder = SampleDecoder.for_model(str(shards), config, meta["labels"], WordTokenizer.build(meta["words"]))
    orders = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dataset = streaming_dataset(str(shards), decoder, shuffle=True, seed=3)
        epochs = []
        for epoch in (1, 2):
            dataset.set_epoch(epoch)
            epochs.append([s.id for s in dataset])
        orders.append(epochs)
    for epoch in (0, 1):
        rank0, rank1 = orders[0][epoch], orders[1][epoch]
        assert not set(rank0) & set(rank1)
        assert len(set(rank0) | set(rank1)) >= meta["samples"] - 1  # each rank's share, the rest dropped
    assert orders[0][0] != orders[0][1]  # a new order each epoch


def test_a_bad_packed_file_names_the_sample(shards: Path, tmp_path: Path) -> None:
    config = tiny_config()
    meta = read_meta(str(shards))
    decoder = SampleDecoder.for_model(str(shards), config, meta["labels"], WordTokenizer.build(meta["words"]))
    item = {
        "id": "s0-3",
        "meta": json.dumps(
            {"text": "one", "label": "odd", "captions": [], "has_image": True, "has_audio": False}
        ),
        "image": b"not a png",
        "audio": b"",
    }
    with pytest.raises(ShardError, match=r"sample 's0-3': image: cannot decode it"):
        decoder(item)


RESUMABLE = ["--trainer.max_epochs=2", "--trainer.deterministic=true", "--checkpoint.last_every_n_steps=2"]


def test_training_from_shards_resumes_mid_epoch_exactly(
    digit_manifests: dict[str, Path], shards: Path, tmp_path: Path
) -> None:
    """48 samples, batch 8: 6 steps per epoch, 2 epochs; last.ckpt every 2 steps; killed after step 9."""
    evaluate = {k: v for k, v in digit_manifests.items() if k != "train"}
    data = [f"--data.train_shards={shards}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = start(fit_command(full, evaluate, *data, *RESUMABLE), full / "out.txt")
    killed = start(fit_command(cut, evaluate, *data, *RESUMABLE, pause_at_step=9), cut / "out.txt")
    kill_when_paused(killed, cut)
    restart = fit_command(cut, evaluate, *data, *RESUMABLE, "--ckpt_path=last")
    finish(start(restart, cut / "out2.txt"), cut / "out2.txt")
    finish(uninterrupted, full / "out.txt")

    def ids(root: Path) -> list[list[str]]:
        return [r["ids"] for r in map(json.loads, (root / "log.jsonl").read_text().splitlines())]

    reference, resumed = ids(full), ids(cut)
    assert len(reference) == 12 and len({i for batch in reference[:6] for i in batch}) == 48
    assert reference[:6] != reference[6:]  # epoch 2 in another order
    assert resumed[:9] == reference[:9] and resumed[9:] == reference[8:]  # step 9 redone, then 10..12
    assert losses(cut)[9:] == losses(full)[8:]
    assert same_weights(full, cut)


def test_packing_a_bad_manifest_names_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"id": "a", "text": "one", "label": "odd"}\n{"id": "b", "image": "gone.png"}\n')
    with pytest.raises(SystemExit) as stop:
        pack_main([str(manifest), str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {manifest}:2: field 'image'") and "gone.png" in error, error

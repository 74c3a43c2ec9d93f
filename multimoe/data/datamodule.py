"""LightningDataModule over manifest files: reads and checks every manifest up front, so a bad row stops the
run before the first step. The label set and vocabulary come from the training manifest, or, to evaluate a
checkpoint, from the checkpoint (then no training manifest is needed)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, cast

import lightning as L
from torch.utils.data import DataLoader

from multimoe.config import ConfigError, MultiMoEConfig
from multimoe.data.collate import Batch, Collator
from multimoe.data.dataset import ManifestDataset, SamplingOptions
from multimoe.data.manifest import ManifestRow, label_set, read_manifest
from multimoe.data.resumable import ResumableLoader, ResumableSampler
from multimoe.data.shards import SampleDecoder, litdata, read_meta, streaming_dataset
from multimoe.tokenizer import WordTokenizer


class MultiModalDataModule(L.LightningDataModule):
    """Args:
    train_manifest: manifest for training; its labels and words give the model's classes and vocabulary.
        Only ``fit`` needs it (or ``train_shards``).
    train_shards: instead of ``train_manifest`` (which is then not read), a folder or URL of shards written by
        ``python -m multimoe.data.pack``, streamed with litdata (shuffled, split over ranks and workers,
        resumable mid-epoch); its ``multimoe.json`` gives the classes and vocabulary.
    val_manifest, test_manifest, predict_manifest: any other manifests (predict falls back to test).
    batch_size, num_workers: DataLoader settings.
    config: the model's config (linked from ``model.config`` by the CLI): which modalities to read and how
        to process them.
    cache: keep decoded images and waveforms in memory (files are often reused across samples).
    skip_bad_rows: leave out bad rows (found before the first step, or a file that fails to load later) and
        count them, instead of stopping with an error that names the row.
    modality_dropout: in training, drop each modality of a sample with this probability (never all of them).
    drop_modalities: modalities removed from every sample of every stage, e.g. ``audio`` or ``[audio, text]``:
        to evaluate without them; samples left with nothing are left out.
    base_vocab: a checkpoint's vocabulary, whose words keep their ids; a training manifest's new words are
        appended (set by the CLI to fine-tune or evaluate a checkpoint).
    base_labels: a checkpoint's label set, used as it is; the training manifest is then not read (set by the
        CLI to evaluate a checkpoint with ``--ckpt_path``).
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        train_shards: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        predict_manifest: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        config: MultiMoEConfig | None = None,
        cache: bool = True,
        skip_bad_rows: bool = False,
        modality_dropout: float = 0.0,
        drop_modalities: list[str] | str | None = None,
        base_vocab: list[str] | None = None,
        base_labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(
                f"data: batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}"
            )
        self.config = config or MultiMoEConfig()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache
        self.skip_bad_rows = skip_bad_rows
        drop = [drop_modalities] if isinstance(drop_modalities, str) else list(drop_modalities or [])
        self.sampling = SamplingOptions(modality_dropout, drop)
        paths = {
            "validate": val_manifest,
            "test": test_manifest,
            "predict": predict_manifest or test_manifest,
        }
        if train_manifest is not None and train_shards is not None:  # e.g. a config's manifest, shards given
            warnings.warn(
                f"data.train_shards {train_shards} is read for training, data.train_manifest "
                f"{train_manifest} is not",
                stacklevel=2,
            )
            train_manifest = None
        self.train_shards = train_shards
        shard_meta = read_meta(train_shards) if train_shards is not None else None
        train: list[ManifestRow] = []
        if train_manifest is not None and base_labels is None:
            train = read_manifest(Path(train_manifest), skip_bad_rows=skip_bad_rows)
        if base_labels is not None:
            self.labels: list[str] = list(base_labels)
        else:
            self.labels = list(shard_meta["labels"]) if shard_meta is not None else label_set(train)
        self.rows: dict[str, list[ManifestRow]] = ({"fit": train} if train else {}) | {
            stage: read_manifest(Path(path), self.labels, skip_bad_rows)
            for stage, path in paths.items()
            if path is not None
        }
        texts = [t for r in train for t in [r.text or "", *r.captions]]
        texts += shard_meta["words"] if shard_meta is not None else []
        self.words = WordTokenizer.build(texts, base_vocab)
        self.vocab: list[str] = self.words.vocab
        self.datasets: dict[str, ManifestDataset] = {}
        self.train_loader: Any = None  # a ResumableLoader, or litdata's StreamingDataLoader from shards
        self.train_position: dict[str, Any] | None = None  # from a checkpoint, for the next train loader

    def setup(self, stage: str | None = None) -> None:
        for name, rows in self.rows.items():
            if name not in self.datasets:
                sampling = self.sampling if name == "fit" else self.sampling.without_dropout()
                self.datasets[name] = ManifestDataset.for_model(
                    rows,
                    self.config,
                    self.labels,
                    self.words,
                    cache=self.cache,
                    sampling=sampling,
                    skip_bad_rows=self.skip_bad_rows,
                )
        self.collate = Collator.for_model(self.config, self.words)

    def _loader(self, stage: str, cls: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader[Batch]:
        if stage not in self.datasets:
            raise ConfigError(f"no manifest given for '{stage}': set data.{_ARG[stage]}")
        return cls(
            self.datasets[stage],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled, sharded over the ranks (``batch_size`` per rank) and resumable mid-epoch."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self.train_shards is not None:
            return self._shard_loader(seed)
        sampler = ResumableSampler(self.datasets["fit"], world, rank, shuffle=True, seed=seed)
        loader = self._loader("fit", ResumableLoader, sampler=sampler)
        self.train_loader = cast(ResumableLoader[Batch], loader)
        if self.train_position:
            self.train_loader.seek(self.train_position)
            self.train_position = None
        return self.train_loader

    def _shard_loader(self, seed: int) -> DataLoader[Batch]:
        assert self.train_shards is not None
        decoder = SampleDecoder.for_model(
            self.train_shards,
            self.config,
            self.labels,
            self.words,
            sampling=self.sampling,
            skip_bad_rows=self.skip_bad_rows,
        )
        dataset = streaming_dataset(self.train_shards, decoder, shuffle=True, seed=seed)
        self.train_loader = litdata().StreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate
        )
        if self.train_position:
            self.train_loader.load_state_dict(self.train_position)
            self.train_position = None
        return cast(DataLoader[Batch], self.train_loader)

    # The data position travels in the datamodule's own checkpoint state. (Lightning 2.6 restores a stateful
    # train loader itself only if configure_optimizers does not read trainer.estimated_stepping_batches, which
    # builds the loader before the checkpoint is read; ours does.)
    def state_dict(self) -> dict[str, Any]:
        if self.train_loader is None or self.trainer is None:
            return {}
        # batches whose training step finished (a checkpoint inside on_train_batch_end counts its own batch)
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker
        trained = progress.processed  # type: ignore[attr-defined]
        if self.train_shards is not None:  # litdata counts the batches served; Lightning trained them all
            return {"train_position": self.train_loader.state_dict()}
        return {"train_position": self.train_loader.position(trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_position = state.get("train_position")
        if self.train_position and self.train_loader:
            if self.train_shards is not None:
                self.train_loader.load_state_dict(self.train_position)
            else:
                self.train_loader.seek(self.train_position)
            self.train_position = None

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader("validate")

    def test_dataloader(self) -> DataLoader[Batch]:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader[Batch]:
        return self._loader("predict")


_ARG = {
    "fit": "train_manifest",
    "validate": "val_manifest",
    "test": "test_manifest",
    "predict": "predict_manifest",
}

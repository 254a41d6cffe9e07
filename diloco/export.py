"""A train run's checkpoint as a Hugging Face folder (``coordinator checkpoints export``, and
what ``--serve`` loads): the global parameters under HF names, ``config.json`` from the model
config stored with the checkpoint, and the tokenizer the run trains with (from the run config in
the checkpoint's meta). Outer momenta stay behind: they are optimizer state, not the model.
``export_latest`` does the same for a run's latest checkpoint fetched from the coordinator, into
the lowband cache (``peer join --serve RUN@latest``)."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from peer.blobs import InvalidName, check_run
from pipeline.hf_export import ExportError, save_hf
from pipeline.loading import ModelLoadError
from pipeline.model import LlamaConfig

from .data import cache_root
from .errors import ConfigError
from .run_client import RunClient
from .run_config import RunConfig, run_tokenizer
from .state_io import MOMENTUM_PREFIX

log = logging.getLogger("lowband.diloco.export")


def model_config(config: Any) -> LlamaConfig:
    """The ``LlamaConfig`` a checkpoint's manifest stores (``dataclasses.asdict`` of it)."""
    if not isinstance(config, Mapping) or not config:
        raise ExportError("the checkpoint stores no model config: it was not written by a train peer")
    try:
        return LlamaConfig(**config)
    except (TypeError, ValueError) as e:
        raise ExportError(f"the checkpoint's model config is not a lowband model config: {e}") from e


def export_hf(tensors: Mapping[str, Tensor], config: Any, meta: Mapping, out_dir: str | os.PathLike, *,
              dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the folder for a checkpoint's ``tensors`` (``coordinator.checkpoints.load_state``),
    its manifest ``config`` and ``meta``. ExportError on anything that does not describe a
    lowband model; a checkpoint without a run config is written without a tokenizer."""
    cfg = model_config(config)
    params = {n: t for n, t in tensors.items() if not n.startswith(MOMENTUM_PREFIX)}
    run = meta.get("run_config") if isinstance(meta, Mapping) else None
    tokenizer = None
    if run is None:
        log.warning("the checkpoint names no run config: exporting without a tokenizer")
    else:
        try:
            run_cfg = RunConfig.from_dict(run)
        except ConfigError as e:
            raise ExportError(f"the checkpoint's run config is invalid: {e}") from e
        try:
            tokenizer = run_tokenizer(run_cfg)
        except ModelLoadError as e:  # the reference tokenizer's package is not installed
            raise ExportError(f"cannot load the run's tokenizer: {e}") from e
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ExportError(f"the run's tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    return save_hf(out_dir, params, cfg, tokenizer, dtype=dtype, metadata=metadata)


async def export_latest(client: RunClient, run: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder of ``run``'s latest checkpoint on the coordinator (what
    ``peer join --serve RUN@latest`` serves): downloaded (every chunk verified against the
    manifest) and exported once into ``<cache>/exports/<run>/<step>-<state hash>``, then reused.
    The coordinator publishes only states its write rules accept (the run's agreed hash), so
    the latest checkpoint is the swarm's. ExportError when the run has none."""
    manifest = await client.latest_manifest(run)
    if manifest is None:
        raise ExportError(f"run {run} has no checkpoint yet")
    folder = cache_root(cache_dir) / "exports" / manifest.run / f"{manifest.step}-{manifest.state_hash[:16]}"
    if (folder / "config.json").is_file():  # config.json is written last: the folder is whole
        return folder
    tensors = await client.download_checkpoint(manifest)
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}")
    try:
        await asyncio.to_thread(export_hf, tensors, manifest.config, manifest.meta, tmp, metadata={
            "lowband_run": manifest.run, "lowband_step": str(manifest.step),
            "lowband_state_hash": manifest.state_hash})
        try:
            tmp.rename(folder)
        except OSError:  # another process exported the same checkpoint meanwhile
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


async def serve_source(daemon, name: str) -> Path:
    """``peer join --serve RUN@latest``: the folder to serve for ``name``, through the daemon's
    coordinator session (the ``lowband.model_sources`` entry point ``run`` that the serve role
    asks for a name with an ``@``; pipeline/ cannot import diloco/)."""
    run, _, which = name.rpartition("@")
    if which != "latest":
        raise ExportError(f"serve a run's checkpoint as RUN@latest, not {name!r}")
    try:
        check_run(run)
    except InvalidName as e:
        raise ExportError(f"bad run name in {name!r}: {e}") from e
    client = daemon.client.derive(RunClient)
    try:
        return await export_latest(client, run)
    finally:
        await client.close()

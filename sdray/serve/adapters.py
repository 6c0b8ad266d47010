"""Many LoRA adapters behind one endpoint: the adapter store, per-request selection, and loading into the UNet.

The store (``serve.adapters``) is a local directory or an ``s3://`` prefix with one subdirectory per adapter,
each holding ``pytorch_lora_weights.safetensors`` (what `sdray train` with `train.lora` exports); the name of
the subdirectory is the adapter's name. Requests choose an adapter by name (OpenAI ``model: "<base>:<name>"``,
AUTOMATIC1111 ``<lora:name:weight>`` prompt tags, or Serve's ``serve_multiplexed_model_id`` header); the
ingress passes the name as the handle's multiplexed model id, so Serve routes the request to a model replica
that already holds it, and the replica loads it lazily through ``@serve.multiplexed`` (LRU of
``serve.max_adapters_per_replica``). Light at import (no torch): the ingress imports this module.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sdray.errors import InputError
from sdray.serve.request import GenerationRequest

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

WEIGHTS_FILE = (
    "pytorch_lora_weights.safetensors"  # = sdray.models.lora.WEIGHTS_FILE (that module imports torch)
)
MAX_ADAPTER_SCALE = 4.0
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
"""Ray Serve's HTTP header for a multiplexed model id; here it names the adapter of a request."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>")


class UnknownAdapter(InputError):
    """A request names an adapter the store does not have (HTTP 404)."""

    status = 404


class AdapterError(InputError):
    """A request's adapter or its scale cannot be used: bad choice, or the adapter fails to load (HTTP 422)."""

    status = 422


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter a request asked for (``""``: the base model) and the scale of its update."""

    name: str = ""
    scale: float = 1.0

    def apply(self, gen: GenerationRequest) -> GenerationRequest:
        if not -MAX_ADAPTER_SCALE <= self.scale <= MAX_ADAPTER_SCALE:
            raise AdapterError(f"adapter scale must be in -{MAX_ADAPTER_SCALE:g}..{MAX_ADAPTER_SCALE:g}")
        return replace(gen, adapter=self.name, adapter_scale=self.scale if self.name else 1.0)


def list_adapters(root: str | None) -> dict[str, str]:
    """Adapter name -> directory (path or URI) of every subdirectory of ``root`` that holds a weights file."""
    if not root:
        return {}
    import pyarrow.fs as pafs

    from sdray.storage import join, resolve

    fs, path = resolve(root)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    found = {}
    for entry in entries:
        name = entry.base_name
        if entry.type != pafs.FileType.Directory or not _NAME.match(name):
            continue
        if fs.get_file_info(f"{entry.path}/{WEIGHTS_FILE}").type == pafs.FileType.File:
            found[name] = join(root, name)
    return dict(sorted(found.items()))


class AdapterCatalog:
    """The store's listing, read at start and again on `refresh` (or when a request names an unseen adapter)."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.adapters = list_adapters(root)

    def refresh(self) -> list[str]:
        self.adapters = list_adapters(self.root)
        log.info("adapters in %s: %s", self.root, ", ".join(self.adapters) or "none")
        return list(self.adapters)

    def uri(self, name: str) -> str:
        """The directory of adapter ``name``; UnknownAdapter naming the known ones if the store lacks it."""
        if name not in self.adapters and self.root:
            self.refresh()
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none (serve.adapters is " + (
                f"{self.root})" if self.root else "not set)"
            )
            raise UnknownAdapter(f"unknown adapter {name!r}; known adapters: {known}")
        return self.adapters[name]


def from_model_field(model: str | None, base: str) -> AdapterChoice:
    """OpenAI ``model``: empty or the base id -> base; ``<base>:<adapter>`` -> that adapter."""
    if not model or model == base:
        return AdapterChoice()
    head, sep, name = model.rpartition(":")
    if not sep or head != base:
        raise UnknownAdapter(
            f"unknown model {model!r}; this endpoint serves {base!r} and '{base}:<adapter>' "
            "(GET /v1/models lists them)"
        )
    return AdapterChoice(name)


def strip_lora_tags(prompt: str) -> tuple[str, AdapterChoice | None]:
    """AUTOMATIC1111 ``<lora:name:weight>`` tags: the prompt without them, and the adapter they choose.

    One adapter per request (a replica runs one adapter per UNet call); a missing weight means 1.
    """
    tags = _LORA_TAG.findall(prompt)
    if not tags:
        return prompt, None
    names = {name for name, _ in tags}
    if len(tags) > 1:
        raise AdapterError(f"prompt: one <lora:...> tag per request, got {len(tags)} ({', '.join(names)})")
    name, weight = tags[0]
    try:
        scale = float(weight) if weight else 1.0
    except ValueError:
        raise AdapterError(f"prompt: <lora:{name}:{weight}>: the weight must be a number") from None
    text = re.sub(r"\s{2,}", " ", re.sub(r"\s*" + _LORA_TAG.pattern, "", prompt)).strip()
    return text, AdapterChoice(name, scale)


def from_header(value: str | None, base: str) -> AdapterChoice:
    """Serve's multiplexed-model-id header: an adapter name or ``<base>:<adapter>``."""
    if not value:
        return AdapterChoice()
    return from_model_field(value, base) if ":" in value else AdapterChoice(value)


def check_name(choice: AdapterChoice, catalog: AdapterCatalog) -> None:
    if choice.name:
        catalog.uri(choice.name)


# --- model replica side (torch) ---


class LoadedAdapter:
    """An adapter resident in the replica's UNet; Serve's multiplex LRU calls `__del__` when it evicts it."""

    def __init__(self, pipe: StableDiffusionPipeline, name: str, uri: str) -> None:
        self.pipe, self.name = pipe, name
        load_adapter(pipe, name, uri)
        self.loaded = True

    def __del__(self) -> None:
        if getattr(self, "loaded", False) and not sys.is_finalizing():
            self.loaded = False
            self.pipe.delete_adapters([self.name])  # drops the peft matrices: the memory is freed
            log.info("adapter %s unloaded", self.name)


def load_adapter(pipe: StableDiffusionPipeline, name: str, uri: str) -> None:
    """Load adapter ``name`` from directory ``uri`` into ``pipe`` (inactive); AdapterError if it cannot."""
    from sdray.models.lora import check_fits, weights_file

    try:
        file = weights_file(uri)
        options: dict[str, Any] = {
            "weight_name": WEIGHTS_FILE,
            "use_safetensors": True,
            "local_files_only": True,
        }
        state, _ = pipe.lora_state_dict(str(file.parent), **options)
        check_fits(pipe.unet, state, f"adapter {name}")
        pipe.load_lora_weights(str(file.parent), adapter_name=name, **options)
    except InputError as exc:
        raise AdapterError(f"adapter {name!r} cannot be loaded: {exc}") from None
    except Exception as exc:  # a corrupt file: safetensors' or peft's error, shortened for the client
        if name in loaded_adapters(pipe):
            pipe.delete_adapters([name])
        raise AdapterError(
            f"adapter {name!r} cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    log.info("adapter %s loaded from %s", name, uri)


def loaded_adapters(pipe: StableDiffusionPipeline) -> list[str]:
    return sorted({n for names in pipe.get_list_adapters().values() for n in names})


def activate(pipe: StableDiffusionPipeline, choice: AdapterChoice) -> None:
    """Make ``choice`` the only adapter applied by the UNet (the base model when its name is empty)."""
    if not loaded_adapters(pipe):
        return
    if choice.name:
        pipe.enable_lora()
        pipe.set_adapters([choice.name], adapter_weights=[choice.scale])
    else:
        pipe.disable_lora()


def lora_parameters(pipe: StableDiffusionPipeline) -> int:
    """Number of LoRA matrix elements in the UNet (what eviction must bring back down)."""
    return sum(p.numel() for n, p in pipe.unet.named_parameters() if ".lora_" in n)

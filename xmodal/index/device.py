"""Where a FAISS index runs: on every GPU (sharded) when faiss-gpu finds one, else on the CPU.

Indexes are always built and stored in CPU form; a GPU copy is made for the heavy steps (k-means
training, search) only when ``faiss.get_num_gpus() > 0``, because faiss-gpu imports fine on a
GPU-less machine but ``index_cpu_to_*gpu*`` raises there.
"""

from __future__ import annotations

import faiss

# GPU flat and IVF search return at most this many neighbours per query (faiss 1.15 limit).
GPU_MAX_K = 2048


def gpu_count(use_gpu: bool | None = None) -> int:
    """GPUs to use: all that faiss sees unless ``use_gpu`` is False; True without a GPU is an error."""
    n = faiss.get_num_gpus()
    if use_gpu and n == 0:
        raise RuntimeError(
            "GPU requested but faiss sees no GPU: install the `gpu` extra (faiss-gpu) on a CUDA machine, "
            "or leave --gpu off to use the CPU"
        )
    return 0 if use_gpu is False else n


def gpu_supported(index: faiss.Index) -> bool:
    """Flat and IVF indexes have GPU versions; HNSW (and refine wrappers) stay on the CPU."""
    return isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ))


def to_search_device(index: faiss.Index, n_gpus: int) -> faiss.Index:
    """A copy sharded across all GPUs when there are GPUs and the index type runs there; else ``index``."""
    if n_gpus == 0 or not gpu_supported(index):
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds a slice: the archive need not fit on one card
    return faiss.index_cpu_to_all_gpus(index, co=options)


def gpu_clustering_index(dim: int, n_gpus: int) -> faiss.Index | None:
    """A GPU flat index for IVF k-means assignment (the costly part of training), or None on CPU."""
    if n_gpus == 0:
        return None
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))


def set_search_param(index: faiss.Index, name: str, value: int) -> None:
    """``nprobe`` (IVF) or ``efSearch`` (HNSW) on a CPU index or its GPU copy."""
    space = faiss.ParameterSpace() if faiss.get_num_gpus() == 0 else faiss.GpuParameterSpace()
    try:
        space.set_index_parameter(index, name, value)
    except RuntimeError:  # a CPU-only index (HNSW) while GPUs exist
        faiss.ParameterSpace().set_index_parameter(index, name, value)

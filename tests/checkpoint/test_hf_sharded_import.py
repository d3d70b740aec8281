"""HF Llama folders loaded shard by shard into sharded models, and streamed HF export.

An HF folder saved by transformers (GQA, several safetensors shards) is loaded into dp 2 x tp 2
and into FSDP 2 (a shape whose dim-0 shards cut heads, and uneven ones): the parameters are
bitwise the converted HF tensors and the sharded model's logits equal transformers' (atol
1e-5, fp32). Every safetensors read a rank makes is counted: each rank reads exactly its own
slices (of wq and wk, the whole heads they touch), so never a whole tensor but a wk that is a
single cut kv head. Pretraining started from the folder equals pretraining from its
conversion. The export reads one tensor at a time and round-trips through transformers.
"""

from __future__ import annotations

import json
import os
import weakref
from collections import Counter
from pathlib import Path

import pytest
import safetensors
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor

import llama_dist.checkpoint.convert as convert
import llama_dist.models.hf_adapter as hf_adapter
from llama_dist.checkpoint import load_model_checkpoint, save_model_checkpoint
from llama_dist.checkpoint.init import check_init_from, load_initial_weights
from llama_dist.config import register_configs, to_job_config
from llama_dist.data.prepare import write_token_dataset
from llama_dist.metrics.logger import read_metrics
from llama_dist.models import Llama, LlamaConfig
from llama_dist.models.hf_adapter import from_hf_state_dict, load_hf_folder, read_hf_config
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
# tp 2 holds 3 query heads and 1 kv head per rank; FSDP over it cuts both in half.
DP2_TP2 = LlamaConfig(
    dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=96, max_seq_len=64
)
# FSDP 2 cuts wq (3 heads) and wk (1 head) mid-head; the 251-row embedding splits 126 / 125.
FSDP2 = LlamaConfig(
    dim=48, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=251, ffn_hidden_dim=100, max_seq_len=64
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def hf_model(cfg: LlamaConfig, seed: int):
    """A random transformers LlamaForCausalLM of `cfg`'s shape; norms perturbed and q/k
    sharpened so that a swapped name or a rotary mistake shows in the logits."""
    import transformers  # here, not in the spawned ranks, which do not need it

    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.num_kv_heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(3.0 * noise / param.shape[-1] ** 0.5)
            elif name == "lm_head.weight":  # logits of std 0.5: atol 1e-5 is ~1e-5 relative
                param.copy_(0.5 * noise / param.shape[-1] ** 0.5)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model


def save_sharded(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def tokens(cfg: LlamaConfig, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """(folder, expected logits on `tokens`, our state dict) per layout's shape."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, cfg, seed in [("dp2_tp2", DP2_TP2, 1), ("fsdp2", FSDP2, 2)]:
        model = hf_model(cfg, seed)
        folder = save_sharded(model, root / name)
        with torch.no_grad():
            logits = model(input_ids=tokens(cfg, seed)).logits
        out[name] = (folder, logits, from_hf_state_dict(model.state_dict(), cfg))
    return out


# Counting what each rank reads --------------------------------------------------------------
class _CountingSlice:
    def __init__(self, inner, name: str, counts: Counter) -> None:
        self._inner, self._name, self._counts = inner, name, counts

    def __getitem__(self, index):
        tensor = self._inner[index]
        self._counts[self._name] += tensor.numel()
        return tensor

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


class _CountingFile:
    """A safetensors file whose tensor reads, whole or sliced, are counted by name."""

    def __init__(self, inner, counts: Counter) -> None:
        self._inner, self._counts = inner, counts

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._inner.__exit__(*exc_info)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self._inner.get_tensor(name)
        self._counts[name] += tensor.numel()
        return tensor

    def get_slice(self, name: str) -> _CountingSlice:
        return _CountingSlice(self._inner.get_slice(name), name, self._counts)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def count_safetensors_reads() -> Counter:
    """Elements read per HF tensor name through any safetensors handle this process opens
    (DCP's HuggingFaceStorageReader imports safe_open when it reads; the adapter at import)."""
    counts: Counter = Counter()
    real = safetensors.safe_open

    def counting_open(*args, **kwargs):
        return _CountingFile(real(*args, **kwargs), counts)

    safetensors.safe_open = counting_open
    hf_adapter.safe_open = counting_open
    return counts


def allowed_reads(model: Llama, cfg: LlamaConfig) -> dict[str, int]:
    """Elements of each HF tensor this rank may read: its shard, and of wq and wk the rows of
    the whole heads its shard touches."""
    allowed = {}
    for name, param in model.named_parameters():
        [chunk] = param.__create_chunk_list__()
        rows, cols = chunk.sizes if len(chunk.sizes) == 2 else (chunk.sizes[0], 1)
        if name.endswith(("wq.weight", "wk.weight")) and rows:
            first, hd = chunk.offsets[0], cfg.head_dim
            rows = (-(-(first + rows) // hd) - first // hd) * hd
        allowed[hf_adapter.to_hf_key(name)] = rows * cols
    return allowed


def import_worker(folder: str, parallel: dict, batch: torch.Tensor) -> dict:
    counts = count_safetensors_reads()
    cfg = read_hf_config(folder)
    parallel_cfg = ParallelConfig(**parallel)
    parallel_cfg.validate(dist.get_world_size(), cfg, seq_len=batch.shape[1])
    mesh = build_mesh(parallel_cfg, device="cpu")
    model = build_llama(cfg, parallel_cfg, mesh, device=torch.device("cpu"), seed=5)
    loaded = load_initial_weights(model, folder)
    reads = [None] * dist.get_world_size()
    # Before forward, after which FSDP keeps the last group's parameters unsharded.
    dist.all_gather_object(reads, (dict(counts), allowed_reads(model, cfg)))
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(batch)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    return {"loaded": loaded, "logits": logits, "params": params, "reads": reads}


def check_import(out: dict, folder: Path, expected_logits, expected_sd) -> None:
    assert sorted(out["loaded"]) == sorted(expected_sd)
    for name, tensor in expected_sd.items():
        assert torch.equal(out["params"][name], tensor), name
    assert (out["logits"] - expected_logits).abs().max().item() < TOL
    full = {}
    for file in folder.glob("*.safetensors"):
        with safetensors.safe_open(file, framework="pt") as f:
            full.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    for rank, (counts, allowed) in enumerate(out["reads"]):
        assert set(counts) == set(full), rank
        for hf_name, shape in full.items():
            assert counts[hf_name] == allowed[hf_name], (rank, hf_name)
            # Every tensor is sharded on both layouts, so no rank reads one in full; but where
            # a shard cuts a layer's only kv head, that head is the whole of wk.
            if not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                assert counts[hf_name] < torch.Size(shape).numel(), (rank, hf_name)


def test_hf_folder_into_dp2_tp2_reads_only_each_ranks_slices(hf_folders):
    folder, logits, sd = hf_folders["dp2_tp2"]
    parallel = {"dp_shard": 2, "tp": 2, "loss_parallel": False}
    out = run_distributed(import_worker, 4, str(folder), parallel, tokens(DP2_TP2, 1))
    check_import(out, folder, logits, sd)


# FSDP 2, and pretraining from the same folder -------------------------------------------------
def job(data: Path, *overrides: str):
    register_configs()
    base = [
        f"data.paths=[{data}]",
        "data.seq_len=32",
        "data.valid_fraction=0",
        "train.global_batch_tokens=256",
        "train.micro_batch=2",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.wandb=false",
        "train.device=cpu",
        "optim.warmup_steps=1",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_job_config(compose("pretrain", overrides=[*base, *overrides]))


def fsdp_worker(folder: str, batch: torch.Tensor, runs: dict) -> dict:
    out = import_worker(folder, {"dp_shard": 2}, batch)
    out["losses"] = {}
    for name, (cfg, run_dir) in runs.items():
        pretrain(cfg, Path(run_dir))
        records = read_metrics(Path(run_dir))
        out["losses"][name] = [r["loss"] for r in records if r["kind"] == "train"]
    return out


def test_hf_folder_into_fsdp2_and_pretraining_init_from(hf_folders, tmp_path):
    folder, logits, sd = hf_folders["fsdp2"]
    # The same weights as a llama_dist checkpoint, as `convert.py --from-hf` writes them.
    cfg, state_dict = load_hf_folder(folder)
    ckpt = save_model_checkpoint(tmp_path / "ckpt", state_dict, cfg)
    gen = torch.Generator().manual_seed(0)
    docs = [
        [*torch.randint(3, cfg.vocab_size, (40,), generator=gen).tolist(), 2] for _ in range(48)
    ]
    write_token_dataset(tmp_path / "data", docs, vocab_size=cfg.vocab_size)
    runs = {
        name: (job(tmp_path / "data", f"model.from_file={folder}", f"checkpoint.init_from={src}"),
               str(tmp_path / f"run-{name}"))
        for name, src in [("hf", folder), ("checkpoint", ckpt)]
    }  # fmt: skip
    out = run_distributed(fsdp_worker, 2, str(folder), tokens(FSDP2, 2), runs)
    check_import(out, folder, logits, sd)
    # Pretraining started from the HF folder is the run started from its conversion.
    assert len(out["losses"]["hf"]) == 2
    assert out["losses"]["hf"] == out["losses"]["checkpoint"]


# One process, errors --------------------------------------------------------------------------
def test_one_process_import_and_errors(hf_folders, tmp_path):
    folder, logits, sd = hf_folders["dp2_tp2"]
    assert not dist.is_initialized()
    model = Llama(DP2_TP2)
    assert sorted(load_initial_weights(model, folder)) == sorted(sd)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sd[name]), name
    with torch.no_grad():
        assert (model(tokens(DP2_TP2, 1)) - logits).abs().max().item() < TOL

    with pytest.raises(ValueError, match=r"another shape: n_layers=2 \(this model: 3\)"):
        check_init_from(folder, DP2_TP2.replace(n_layers=3))
    with pytest.raises(ValueError, match="lacks 9 weights of this model"):
        load_initial_weights(Llama(DP2_TP2.replace(n_layers=3)), folder)
    with pytest.raises(ValueError, match="has shape .* the folder holds another model shape"):
        load_initial_weights(Llama(DP2_TP2.replace(ffn_hidden_dim=64)), folder)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in folder.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    shard = sorted(damaged.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{shard.name} cannot be read as safetensors"):
        load_initial_weights(Llama(DP2_TP2), damaged)


# Streamed export ------------------------------------------------------------------------------
def test_streamed_export_round_trips_through_transformers(tmp_path, monkeypatch, capsys):
    cfg = DP2_TP2
    ours = Llama(cfg)
    ours.init_weights(3)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith(("wq.weight", "wk.weight")):
                param.mul_(10.0)  # at init scale attention is nearly uniform
    ckpt = save_model_checkpoint(tmp_path / "ckpt", ours.state_dict(), cfg)

    # Each tensor is read alone, and the previous one's memory is freed by then (a storage's
    # Python object lives exactly as long as some tensor uses the storage).
    real_read, alive, reads = convert.read_model_tensor, [], []

    def read_one(folder, name, shape, dtype):
        assert all(ref() is None for ref in alive), f"a tensor was still held when reading {name}"
        tensor = real_read(folder, name, shape, dtype)
        alive.append(weakref.ref(tensor.untyped_storage()))
        reads.append(name)
        return tensor

    monkeypatch.setattr(convert, "read_model_tensor", read_one)
    args = ["--to-hf", str(ckpt), "--out", str(tmp_path / "hf"), "--max-shard-size", "30KB"]
    assert convert.main(args) == 0
    assert "wrote HF LlamaForCausalLM folder" in capsys.readouterr().out
    assert sorted(reads) == sorted(ours.state_dict())

    out = tmp_path / "hf"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == 4 * cfg.num_params()
    for name in shards:  # at most 30 kB unless one tensor is larger
        with safetensors.safe_open(out / name, framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert len(sizes) == 1 or nbytes <= 30_000, name
    assert os.stat(out / shards[0]).st_mode & 0o777 == 0o666 & ~_umask()

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    batch = tokens(cfg, 4)
    with torch.no_grad():
        assert (hf(input_ids=batch).logits - ours.eval()(batch)).abs().max().item() < TOL
    # And back: bitwise.
    _, back = load_hf_folder(out)
    _, saved = load_model_checkpoint(ckpt)
    assert all(torch.equal(back[k], saved[k]) for k in saved)

    assert convert.main([*args[:3], str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots' is not a size" in capsys.readouterr().err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

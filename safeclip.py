"""Safe-CLIP in one file: a CLIP in plain PyTorch, its inputs, and the Safe-CLIP fine-tuning loop.

Safe-CLIP (Poppi et al., ECCV 2024) fine-tunes CLIP so that an unsafe (NSFW) caption or image lands
where its *safe* counterpart lands, while safe inputs keep the place the original CLIP gave them.
Downstream models that read CLIP's embeddings (Stable Diffusion, LLaVA, retrieval) become safer
without any change of their own.

The file has two parts. Part I is the method, to read top to bottom; its sections and main names:
  1. configuration            CLIPConfig (the sizes), TrainConfig (every training setting, its default)
  2. the model                LayerNorm, Attention, ResidualAttentionBlock, Transformer, VisionTransformer,
                              CLIP (encode_text, encode_image); speed-ups marked "same result, less work"
  3. building it from weights infer_config, build_model
  4. LoRA, where it plugs in  LoRA, add_lora, _plain_state_dict (the merge), choose_trainable
  5. the inputs               image_transform, preprocess_image; token ids
  6. the Safe-CLIP objective  LAMBDAS, cosine_distance, info_nce, weighted_total, safe_clip_loss, clip_loss
  7. data, frozen targets     Quadruplets, collate_quadruplets, frozen_embeddings, frozen_targets,
                              bind_objective
  8. resume, the step, loop   training_state, restore_training_state, Schedule, MicroBatch, autocast, Towers,
                              embed, batch_loss, forward_backward, accumulate, update, lr_at, train
  9. beyond the paper         safer_clip_loss, twin_offset_loss, twin_margin_loss, twin_nce_loss, twin_gap_loss,
                              OBJECTIVES (more objectives on the same loop: Safe-CLIP ends with section 8)
Where each question about the method is answered: these lines alone answer it (about 700 for all six,
train included), none of them in Part II, and they are exact (tests/test_method_map.py keeps them so):
  the loss: its terms, weights and total        lines 722-792    section 6 to safe_clip_loss
  the frozen targets: what, when, how precise   lines 859-940    "The frozen targets" to frozen_targets
  one step, end to end                          lines 1041-1262  "-- one training step" to lr_at
  LoRA: where it plugs in, what trains, merge   lines 568-680    section 4 to choose_trainable
                                                lines 272-339    Linear to Attention (its sockets)
  gradient accumulation (--accum)               lines 1190-1240  forward_backward to concat_embeddings
                                                lines 1029-1038  _rng_state to _set_rng_state (what it replays)
  exact resume                                  lines 974-1038   section 8 to _set_rng_state
  and, for each of them, where it runs          lines 1265-1344  train
Every setting's default is in TrainConfig (section 1); a step's are also listed at "-- one training step".
Part II is the plumbing (after the divider, with its own table of contents): it reads, writes,
checks, fetches and schedules, and decides none of the method's numbers: the full tokenizer,
every weight format, exports, downloads, reading pairs.jsonl, distributed set-up, the run's
bookkeeping (the checkpoint file, log, validation) and the command line. docs/method.md maps each
piece of the paper to the function here.

Usage:
  python safeclip.py train --data pairs.jsonl       # ViT-L/14, the paper's settings, into runs/safeclip
  python evaluate.py --ckpt runs/safeclip           # its test split, against ViT-L/14
  python safeclip.py export runs/safeclip --hf runs/safeclip-hf
  python safeclip.py download ViT-L/14

  import safeclip
  model, preprocess = safeclip.load("ViT-L/14")     # or "runs/safeclip": names and paths alike
  emb = model.encode_text(model.tokenizer(["a photo of a cat"]))
"""

import argparse
import collections
import contextlib
import functools
import gc
import gzip
import hashlib
import heapq
import html
import http.client
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tqdm import tqdm

HERE = Path(__file__).resolve().parent

# =============================================================================================
# PART I. THE METHOD
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class CLIPConfig:
    """Every size of a ViT CLIP. `load` infers all of them from the weights; nobody types them."""

    embed_dim: int = 512  # width of the shared image-text embedding space
    image_resolution: int = 224  # input images are R x R pixels
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32  # the image becomes (R / patch)^2 tokens
    vision_heads: int = 12  # OpenAI: width / 64; OpenCLIP's big towers use wider heads
    context_length: int = 77  # text positions
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    quick_gelu: bool = True  # OpenAI's x * sigmoid(1.702 x); OpenCLIP's LAION models use exact GELU


def setting(default, help, group, **cli):
    """A field of TrainConfig: its default, its one-line help and its --help section (and, in `cli`,
    how the command line spells it: choices, metavar, ...). The command line is built from these."""
    return field(default=default, metadata=dict(help=help, group=group, **cli))


@dataclass
class TrainConfig:
    """Every setting of `safeclip.py train` with its default: `build_parser` makes the command line
    from these fields, `train` takes one, and train_config.json records it. None means "decided
    from the others" (`resolved`). The defaults are the paper's (its public code's where the paper
    is silent): ViT-L/14, LoRA rank 16 on both towers, AdamW at 1e-3, batches of 16."""

    # -- where from, where to, and how the run is kept --
    # data and model
    data: str = setting(None, "pairs.jsonl (safe, unsafe, safe_image[, unsafe_image, category, split])", "data and model",
                        required=True, metavar="PAIRS")
    model: str = setting(None, "weights to fine-tune: an OpenAI name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px) "
                         "or anything safeclip.load reads (default: ViT-L/14, the paper's)", "data and model",
                         metavar="NAME|PATH")
    tokenizer: str = setting(None, "tokenizer for weights that come without one (tokenizer.json or OpenAI's .txt.gz)",
                             "data and model", metavar="PATH")
    scratch: dict = setting(None, "train a new model instead, e.g. 'width=128,layers=4,embed_dim=128,image_resolution"
                            "=32,vision_patch_size=4,context_length=32'", "data and model", metavar="SPEC",
                            parse="parse_scratch")
    vocab_size: int = setting(2000, "BPE vocabulary trained for --scratch without --tokenizer", "data and model",
                              metavar="N")
    quick_gelu: bool = setting(None, "QuickGELU (OpenAI's) or, with --no-quick-gelu, exact GELU (OpenCLIP's LAION "
                               "models); default: what the checkpoint records, else QuickGELU below width 1280 "
                               "(with --scratch: QuickGELU)", "data and model", action=argparse.BooleanOptionalAction)
    out: str = setting("runs/safeclip", "output folder: checkpoints, log.jsonl, the final model; one that already "
                       "holds a run is never overwritten (see --resume)", "data and model", metavar="DIR")
    skip_bad: bool = setting(False, "skip malformed rows and unreadable images instead of stopping", "data and model")
    # objective
    objective: str = setting("safeclip", "safeclip: the eight Safe-CLIP terms; safer-clip: SafeR-CLIP; twin-offset, "
                             "twin-margin, twin-nce, twin-gap: ours (docs/objectives.md); clip: CLIP's own pre-training loss",
                             "objective", choices=("safeclip", "safer-clip", "twin-offset", "twin-margin", "twin-nce",
                                                   "twin-gap", "clip"))
    lambdas: dict = setting(None, "loss weights: the objective's terms' values in order (for safeclip: text_safe, "
                            "text_unsafe, image_safe, image_unsafe, nce_text_safe, nce_text_unsafe, nce_image_safe, "
                            "nce_image_unsafe) or name=value pairs (default: its paper's)", "objective",
                            parse="str")
    offset: float = setting(None, "twin-offset: length a of the unsafe offset; twin-gap: how far, in cosine along "
                            "the modality gap, an unsafe item sits beyond its safe twin (defaults: 1.0 and 0.1)",
                            "objective")
    margin: float = setting(None, "twin-margin, twin-nce: how far, in cosine, a query must score its safe twin above "
                            "the unsafe one (default: 0.3)", "objective", metavar="M")
    margin_tau: float = setting(None, "twin-margin, twin-nce: the smoothing of the hinge, T * softplus(x / T) "
                                "(default: 0.05)", "objective", metavar="T")
    nce_scale: str = setting(None, "logit scale of the InfoNCE terms: a number, or 'model' for the original model's "
                             "own exp(logit_scale) (default: 100, the paper's and OpenAI's CLIPs')", "objective",
                             metavar="S|model")
    # validation and checkpoints
    eval_every: int = setting(None, "steps between validations (default: each epoch)", "validation and checkpoints")
    select: str = setting("loss", "best model by validation loss or by the recall-sum", "validation and checkpoints",
                          choices=("loss", "recall"))
    patience: int = setting(5, "stop after this many validations without improvement (0: never)",
                            "validation and checkpoints")
    save_every: int = setting(None, "also write the resume checkpoint every N steps", "validation and checkpoints")
    resume: bool = setting(False, "continue the run in --out exactly where it stopped, with the same settings (only "
                           "--epochs, --steps, --patience, --save-every, --workers and such may change)",
                           "validation and checkpoints")
    report_to: str = setting(None, "also send the log's curves to TensorBoard (OUT/tensorboard; needs `pip install "
                             "tensorboard`) or W&B (needs `pip install wandb`; WANDB_MODE=offline writes OUT/wandb)",
                             "validation and checkpoints", choices=("tensorboard", "wandb"))
    log_every: int = setting(None, "read the loss terms back from the device and log them every N steps (default: "
                             "10 on CUDA, where each read waits for the GPU; 1 on the CPU)", "validation and checkpoints",
                             metavar="N")
    # hardware
    device: str = setting(None, "default: cuda when present, else cpu", "hardware")
    precision: str = setting(None, "autocast of the step (weights, LayerNorm statistics, loss and optimizer stay "
                             "float32). Default: bf16 on CUDA; fp32 on the CPU, where bf16 is fast only with native "
                             "bf16 matmuls (docs/speed.md)", "hardware", choices=("fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model (on the CPU it needs a C++ compiler, g++)", "hardware")
    grad_checkpointing: bool = setting(False, "trade compute for memory (large towers; docs/training.md)", "hardware")
    workers: int = setting(None, "image loading processes (default: 0 on the CPU, where they would compete with the "
                           "model's threads; up to 8 with CUDA)", "hardware")
    image_cache: float = setting(2048, "with --workers 0, keep the training images decoded after their first epoch "
                                 "when they fit in this many MiB (0: off)", "hardware", metavar="MIB")
    # -- the settings of one training step (section 8): what trains, and how --
    # what trains
    full: bool = setting(False, "full fine-tuning instead of LoRA", "what trains")
    lora_rank: int = setting(16, "rank of the LoRA adapters", "what trains", metavar="R")
    lora_alpha: float = setting(1.0, "LoRA scale is alpha / rank", "what trains", metavar="A")
    lora_dropout: float = setting(0.1, "dropout on the adapters' input", "what trains", metavar="P")
    freeze: list = setting(None, "towers to leave untouched", "what trains", nargs="+", choices=("text", "vision"))
    # optimisation
    lr: float = setting(None, "learning rate (default: 1e-3 LoRA, 1e-5 --full, 5e-4 --scratch; 1e-4 safer-clip)",
                        "optimisation")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay", "optimisation")
    schedule: str = setting("constant", "learning rate after the warm-up: constant, or cosine decay to zero",
                            "optimisation", choices=("constant", "cosine"))
    warmup: int = setting(0, "linear warm-up steps", "optimisation")
    grad_clip: float = setting(1.0, "max gradient norm (0: off)", "optimisation")
    batch_size: int = setting(None, "quadruplets per micro-batch, over all processes (default: 16; 48 safer-clip)",
                              "optimisation")
    accum: int = setting(1, "micro-batches per step: the loss and gradients of one batch N times larger (the same "
                         "rows and InfoNCE negatives; each micro-batch draws its own dropout masks)", "optimisation")
    epochs: int = setting(10, "passes over the training split", "optimisation")
    steps: int = setting(None, "optimizer steps (overrides --epochs)", "optimisation")
    seed: int = setting(0, "adapters' initialisation, dropout and data order", "optimisation")

    def resolved(self):
        """These settings with every "decided from the others" filled in: the model, the objective's
        own recipe (SafeR-CLIP's lr and batch), the learning rate by what trains, and what depends
        on the device (precision, workers, log interval)."""
        c = replace(self)
        if c.scratch is None and c.model is None:
            c.model = "ViT-L/14"  # the paper's backbone
        for option, value in ((OBJECTIVES[c.objective].recipe or {}) if c.objective != "clip" else {}).items():
            if getattr(c, option) is None:
                setattr(c, option, value)
        if c.lr is None:
            c.lr = 5e-4 if c.scratch is not None else 1e-5 if c.full else 1e-3
        if c.batch_size is None:
            c.batch_size = 16
        cuda = (c.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if c.precision is None:
            c.precision = "bf16" if cuda else "fp32"
        if c.workers is None:
            c.workers = min(8, os.cpu_count() or 1) if cuda else 0
        if c.log_every is None:
            c.log_every = 10 if cuda else 1
        return c


# ---------------------------------------------------------------------------------------------
# 2. The model: OpenAI's ViT CLIP, with OpenAI's module names so its weights load as they are
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm in the input's dtype, its statistics in float32 (PyTorch's kernels accumulate
    bf16 and fp16 in float32): one kernel, and no float32 copy of the input kept for backward, as
    autocast's float32 LayerNorm would keep."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class QuickGELU(nn.Module):
    """OpenAI's x * sigmoid(1.702 x), written as silu(1.702 x) / 1.702: the same function, whose
    backward keeps one tensor instead of two."""

    def forward(self, x):
        return F.silu(1.702 * x) / 1.702


class Linear(nn.Linear):
    """nn.Linear that can carry a LoRA adapter (section 4); without one it is a plain Linear."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.lora = None

    def forward(self, x):
        y = super().forward(x)
        return y if self.lora is None else y + self.lora(x)


class PatchEmbedding(nn.Conv2d):
    """The ViT's first layer: a convolution whose kernel and stride are the patch size. Like
    `Linear`, it can carry a LoRA adapter (section 4)."""

    def __init__(self, width, patch):
        super().__init__(3, width, patch, stride=patch, bias=False)
        self.lora = None

    def forward(self, x):
        y = super().forward(x)
        return y if self.lora is None else y + self.lora.conv(x, self.stride)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (OpenAI's files)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)
        self.lora_k = self.lora_v = None  # in in_proj, LoRA on keys and values (not queries), as in the public recipe

    def forward(self, x, causal):
        B, L, C = x.shape  # (batch, positions, width)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        k, v = self.adapt(x, k, v)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))  # (B, L, C)

    def adapt(self, x, k, v):
        """Keys and values plus their LoRA adapters' contributions (section 4), if any. Both
        adapters read the same input: it is dropped out once, and kept for backward once."""
        if self.lora_k is None:
            return k, v
        x = self.lora_k.dropout(x)
        if torch.is_autocast_enabled(x.device.type):  # (else each adapter's matmul would keep its own cast copy)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return k + self.lora_k.project(x), v + self.lora_v.project(x)

    # -- same result, less work ----------------------------------------------------------------
    def pooled(self, x, causal, query):
        """forward(x)[i, query[i]] for each row i, computing only those outputs: (B, L, C) -> (B, C).
        Keys and values still come from every position; the query from one position per row."""
        B, L, C = x.shape
        w_q, w_kv = self.in_proj_weight.split([C, 2 * C])
        b_q, b_kv = self.in_proj_bias.split([C, 2 * C])
        k, v = self.adapt(x, *F.linear(x, w_kv, b_kv).chunk(2, dim=-1))
        q = F.linear(x[torch.arange(B, device=x.device), query][:, None], w_q, b_q)  # (B, 1, C)
        # The causal mask, seen from the one query: positions up to and including its own.
        mask = (torch.arange(L, device=x.device) <= query[:, None])[:, None, None] if causal else None
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, 1|L, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.reshape(B, C))  # (B, C)


class MLP(nn.Module):
    def __init__(self, width, quick_gelu):
        super().__init__()
        self.c_fc = Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width, heads, quick_gelu):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, quick_gelu)

    def forward(self, x, causal=False, query=None):
        if query is not None:
            return self.pooled(x, causal, query)
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))

    # -- same result, less work ----------------------------------------------------------------
    def pooled(self, x, causal, query):
        """forward(x)[i, query[i]] for each row i: (B, L, C) -> (B, C). CLIP reads one token per row
        (the class token, the EOT token), so the last block needs its query, output projection and
        MLP at that token alone: ~1/layers of a tower's work saved."""
        x = x[torch.arange(x.shape[0], device=x.device), query] + self.attn.pooled(self.ln_1(x), causal, query)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x, causal=False, pool=None):
        """(B, L, C) -> (B, L, C); or, given `pool` (B,) positions, the outputs there only (B, C)."""
        for i, block in enumerate(self.resblocks):
            query = pool if i == len(self.resblocks) - 1 else None  # (see ResidualAttentionBlock.pooled)
            if self.grad_checkpointing and torch.is_grad_enabled():  # -- same result, less memory --
                # Recompute activations in the backward pass instead of storing them: less memory
                # for large towers, about a third more compute.
                x = torch.utils.checkpoint.checkpoint(block, x, causal, query, use_reentrant=False)
            else:
                x = block(x, causal, query)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        grid = c.image_resolution // c.vision_patch_size
        self.conv1 = PatchEmbedding(c.vision_width, c.vision_patch_size)
        self.class_embedding = nn.Parameter(torch.empty(c.vision_width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, c.vision_width))
        self.ln_pre = LayerNorm(c.vision_width)
        self.transformer = Transformer(c.vision_width, c.vision_layers, c.vision_heads, c.quick_gelu)
        self.ln_post = LayerNorm(c.vision_width)
        self.proj = nn.Parameter(torch.empty(c.vision_width, c.embed_dim))

    def forward(self, pixels):
        x = self.conv1(pixels)  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + grid*grid, C)
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the class token is the image
        x = self.transformer(self.ln_pre(x), pool=cls)  # (B, C)
        return self.ln_post(x) @ self.proj  # (B, E)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = self.config = config
        self.visual = VisionTransformer(c)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.quick_gelu)
        self.ln_final = LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # stored as a log
        self.tokenizer = None  # attached by `load`
        self.initialize()

    def initialize(self):
        """OpenAI's initialisation, for models trained from scratch (the offline demo)."""
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower, width, layers, scale in ((self.visual.transformer, c.vision_width, c.vision_layers, 1.0),
                                            (self.transformer, c.text_width, c.text_layers, 1.0)):
            proj_std = width ** -0.5 * (2 * layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        vscale = c.vision_width ** -0.5
        nn.init.normal_(self.visual.class_embedding, std=vscale)
        nn.init.normal_(self.visual.positional_embedding, std=vscale)
        nn.init.normal_(self.visual.proj, std=vscale)
        nn.init.normal_(self.text_projection, std=c.text_width ** -0.5)

    def encode_image(self, pixels):
        """(B, 3, R, R) normalised pixels -> (B, E) image embeddings (not L2-normalised)."""
        return self.visual(pixels.to(self.visual.conv1.weight.dtype))

    def encode_text(self, ids):
        """(B, L) token ids -> (B, E) text embeddings (not L2-normalised), read at each EOT token.

        The mask is causal, so the output at EOT depends only on the tokens before it: the padding
        after the longest EOT of the batch can be dropped. A 12-word caption then costs ~15
        positions instead of 77, with the same result up to float rounding. (Ids on the CPU are
        trimmed here; ids already on a GPU as they are: whoever moves them trims them first.)
        """
        if ids.device.type == "cpu" and not torch.compiler.is_compiling():  # (reading the length from a
            ids = trim_padding(ids, multiple=1)  # GPU's ids would wait for it: the training step trims first)
        if ids.shape[1] > self.config.context_length:  # (checked after the trim: padding never counts)
            raise ValueError(f"token ids are {ids.shape[1]} long; this model reads at most "
                             f"{self.config.context_length}: tokenize with context_length="
                             f"{self.config.context_length}")
        eot = ids.argmax(dim=-1)  # EOT has the highest id in the vocabulary
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]  # (B, n, C)
        x = self.transformer(x, causal=True, pool=eot)  # (B, C)
        return self.ln_final(x) @ self.text_projection  # (B, E)

    def forward(self, pixels, ids):
        """OpenAI's interface: (logits_per_image, logits_per_text), scaled cosine similarities."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(ids), dim=-1)
        logits_per_image = self.logit_scale.exp() * image @ text.t()
        return logits_per_image, logits_per_image.t()


# ---------------------------------------------------------------------------------------------
# 3. Building the model from weights: every size inferred from the tensors' shapes
# ---------------------------------------------------------------------------------------------
# Weights arrive as one OpenAI-named state dict, whatever file they came from (Part II reads
# OpenAI's TorchScript releases, plain state dicts, Hugging Face folders and our own folders).
# As in OpenAI's `build_model`, nobody has to say which CLIP a file holds.


class CheckpointError(ValueError):
    """A weight file that cannot be read, or whose tensors do not make a ViT CLIP."""


# OpenCLIP's large vision towers use heads wider than OpenAI's 64; the head count leaves no trace
# in the weights, so it is looked up by width.
OPENCLIP_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
PICKLE_MAX_BYTES = 64 << 20  # a .pt file's index of tensors (data.pkl): a CLIP's is well under 1 MiB


def infer_config(sd):
    """Every size of the model from the shapes in an OpenAI-named state dict (as OpenAI's
    `build_model` does), so a user never has to say which CLIP a file holds."""
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
        raise CheckpointError("this is a ResNet CLIP; only ViT models are supported")
    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        if key not in sd:
            raise CheckpointError(f"missing key {key!r}; not a ViT CLIP state dict")

    def layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + "resblocks.")})

    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=layers("visual.transformer."),
        vision_width=vision_width,
        vision_patch_size=patch,
        # max(1, ...): our own scratch models narrower than 64 have one head (see `scratch_config`).
        vision_heads=max(1, vision_width // OPENCLIP_HEAD_WIDTH.get(vision_width, 64)),
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=max(1, text_width // 64),
        text_layers=layers("transformer."),
        # No OpenAI model is this wide; OpenCLIP's are, and they were trained with exact GELU.
        quick_gelu=vision_width < 1280,
    )


# The largest sizes a CLIP file may imply (ViT-bigG is 1664 wide, 48 layers): past them a file's
# shapes are refused before anything is allocated for them.
CONFIG_LIMITS = dict(embed_dim=8192, image_resolution=4096, vision_layers=256, vision_width=16384, vision_patch_size=512,
                     context_length=4096, vocab_size=1 << 20, text_width=16384, text_layers=256)


def build_model(sd, config, source):
    """A CLIP with exactly these weights: every tensor used, every shape checked, and only then
    the model allocated (a 4 KB file can imply a model of 50 GB)."""
    for field, limit in CONFIG_LIMITS.items():
        if not 1 <= getattr(config, field) <= limit:
            raise CheckpointError(f"{source}: the tensors' shapes imply {field} = {getattr(config, field)}, outside "
                                  f"1..{limit}; not a CLIP this code reads")
    with torch.device("meta"):  # shapes without storage
        expected = CLIP(config).state_dict()
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        problem = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CheckpointError(f"{source}: {problem} ({len(missing)} missing, {len(unexpected)} unexpected "
                              f"for a {config.vision_layers}+{config.text_layers}-layer ViT CLIP)")
    for key, value in sd.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    model = CLIP(config)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


# ---------------------------------------------------------------------------------------------
# 4. LoRA: low-rank adapters, W x + (alpha / r) B A dropout(x), and where they plug in
# ---------------------------------------------------------------------------------------------
# The public recipe adapts the attention keys, values and output, both MLP layers and the patch
# embedding of both towers (rank 16, alpha 1, dropout 0.1), and freezes everything else. The model
# of section 2 has a socket at each of those places: `Linear.lora` (the attention's output
# projection and both MLP layers), `Attention.lora_k` / `lora_v` (read in `Attention.adapt`) and
# `PatchEmbedding.lora`; `add_lora` fills them. Each socket is two lines: the module's output plus
# its adapter's, `y = W x + b` then `y + lora(x)` (for keys and values, `k + lora_k(x)`, `v + lora_v(x)`
# on the same dropped-out x, so they share one dropout mask). Only the adapters' A and B train
# (`choose_trainable`); every original weight is frozen.
#
# The merge: during training the adapters stay separate (the resume checkpoint keeps them so);
# every model the run writes, OUT/best at each better validation and OUT itself at the end (the
# best one), goes through `save` (Part II), which writes `_plain_state_dict` (below): each adapter's
# B A alpha/r folded into its base weight, W' = W + (alpha/r) B A. So a trained model is a plain
# CLIP, with OpenAI's names and sizes, that loads anywhere and costs nothing extra to run.


class LoRA(nn.Module):
    def __init__(self, in_features, out_features, rank, alpha, dropout):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: step 0 is the original model
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.project(self.dropout(x))

    def project(self, x):
        """B A x (alpha / r), scaled on the rank-r intermediate: r values a row, not the output's width."""
        return F.linear(F.linear(x, self.A) * self.scale, self.B)

    def conv(self, pixels, stride):
        """The same adapter over image patches: A is a patch-sized convolution, B a 1x1 one."""
        a = self.A.view(self.A.shape[0], 3, *stride)
        y = F.conv2d(self.dropout(pixels), a.to(pixels.dtype), stride=stride)  # (B, r, grid, grid)
        return torch.einsum("or,brhw->bohw", self.B.to(y.dtype), y) * self.scale

    def delta(self):
        """The weight update this adapter stands for, to fold into the base weight."""
        return (self.B @ self.A) * self.scale


def add_lora(model, rank=16, alpha=1.0, dropout=0.1, towers=("text", "vision")):
    """Attach fresh adapters to `towers` and freeze every other parameter. Returns the adapters'
    parameters (the only ones to train)."""
    for p in model.parameters():
        p.requires_grad_(False)
    roots = {"text": model.transformer, "vision": model.visual.transformer}
    adapters = []

    def make(i, o):
        adapters.append(LoRA(i, o, rank, alpha, dropout).to(model.logit_scale.device))
        return adapters[-1]

    for tower in towers:
        for block in roots[tower].resblocks:
            width = block.attn.out_proj.in_features
            block.attn.lora_k, block.attn.lora_v = make(width, width), make(width, width)
            for linear in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                linear.lora = make(linear.in_features, linear.out_features)
        if tower == "vision":
            conv = model.visual.conv1
            conv.lora = make(3 * conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels)
    return [p for a in adapters for p in a.parameters()]


def lora_modules(model):
    """The adapters of a model, by a stable name (used to save and resume them)."""
    found = {}
    for name, module in model.named_modules():
        for attr in ("lora", "lora_k", "lora_v"):
            if isinstance(getattr(module, attr, None), LoRA):
                found[f"{name}.{attr}"] = getattr(module, attr)
    return found


def _plain_state_dict(model):
    """Model weights in OpenAI naming with every LoRA adapter folded into its base weight."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if ".lora" not in k}
    for name, module in model.named_modules():
        if getattr(module, "lora", None) is not None:
            w = sd[f"{name}.weight"]
            sd[f"{name}.weight"] = w + module.lora.delta().float().cpu().view_as(w)
        if isinstance(module, Attention) and module.lora_k is not None:
            w = sd[f"{name}.in_proj_weight"].clone()
            width = w.shape[1]
            w[width:2 * width] += module.lora_k.delta().float().cpu()
            w[2 * width:] += module.lora_v.delta().float().cpu()
            sd[f"{name}.in_proj_weight"] = w
    return sd


def choose_trainable(model, config):
    """Freeze what does not train: LoRA adapters on the unfrozen towers (the default), or, with
    --full or --scratch, every weight of those towers (the temperature only for `--objective clip`,
    since the Safe-CLIP objective has a fixed scale)."""
    towers = [t for t in ("text", "vision") if t not in (config.freeze or [])]
    if not (config.full or config.scratch is not None):
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, towers)
    else:
        text = [model.token_embedding, model.transformer, model.ln_final]
        for p in model.parameters():
            p.requires_grad_(False)
        for module in (text if "text" in towers else []) + ([model.visual] if "vision" in towers else []):
            module.requires_grad_(True)
        model.text_projection.requires_grad_("text" in towers)
        model.positional_embedding.requires_grad_("text" in towers)
        model.logit_scale.requires_grad_(config.objective == "clip")
    for t in towers:
        (model.transformer if t == "text" else model.visual.transformer).grad_checkpointing = config.grad_checkpointing


# ---------------------------------------------------------------------------------------------
# 5. The inputs: OpenAI's image transform, and token ids
# ---------------------------------------------------------------------------------------------
# Text enters the model as token ids: `model.tokenizer(texts)` -> LongTensor (N, context_length),
# each row SOT, the caption's byte-level BPE ids, EOT, then zeros. EOT has the highest id in the
# vocabulary, which is how `encode_text` finds it (argmax). A caption too long is cut and still
# ends with EOT. The tokenizer itself (OpenAI's text cleaning, BPE, files) is in Part II, and so
# is the exact rounding of the resize and crop below.
#
# Images: OpenAI's Compose([Resize(R, BICUBIC), CenterCrop(R), convert("RGB"), ToTensor(),
# Normalize(mean, std)]). torchvision resizes PIL images with PIL itself, in the image's own mode,
# so the order matters: palette images resize with nearest neighbour (PIL's rule for "P"), RGBA
# with premultiplied alpha.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(resolution: int):
    """The preprocessing of a CLIP with input size `resolution`: PIL.Image -> FloatTensor[3, R, R]."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return functools.partial(preprocess_image, resolution=resolution)  # a partial pickles, for DataLoader workers


def preprocess_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center crop, RGB, [0, 1], normalise: FloatTensor[3, R, R]."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    image = _resize_short_side(image, resolution)
    image = _center_crop(image, resolution)
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # (R, R, 3)
    pixels = pixels.permute(2, 0, 1).float().div(255)  # (3, R, R), the same float32 ops as ToTensor
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return pixels.sub(mean).div(std)


# ---------------------------------------------------------------------------------------------
# 6. The Safe-CLIP objective: eight terms
# ---------------------------------------------------------------------------------------------
# The objective is a pure function of the embeddings of a batch of quadruplets (T, T*, V, V*) and
# of references from the frozen original model, and returns `(total, terms)`. Preserve terms keep
# safe inputs where the original put them; redirect terms move the unsafe ones. `t_ref` = T0(T)
# and `v_ref` = V0(V): every target is the *safe* input's original embedding.
# The public datasets (ViSU-Text, NSFWCaps) ship no unsafe images: Safe-CLIP's two terms on V*
# are then computed over the rows that have one, or skipped.
#
# The InfoNCE terms use a fixed logit scale, the paper's 100 (--nce-scale; `bind_objective`, in
# section 7, binds it and --lambdas to the loss).
# The weights are relative: the total is sum(l_i / sum(l) * term_i) over the terms present, so it
# is a weighted mean of the terms (the eight weights add up to 1.75; without V*, the six left add
# up to 1.05), and a term's share of the gradient is its weight over that sum.

LAMBDAS = {
    "text_safe": 0.10,  # d(T(T), T0(T))              preserve
    "text_unsafe": 0.10,  # d(T(T*), T0(T))           redirect
    "image_safe": 0.10,  # d(V(V), V0(V))             preserve
    "image_unsafe": 0.20,  # d(V(V*), V0(V))          redirect
    "nce_text_safe": 0.25,  # NCE(T(T), V0(V))        preserve
    "nce_text_unsafe": 0.25,  # NCE(T(T*), V0(V))     redirect
    "nce_image_safe": 0.25,  # NCE(T0(T), V(V))       preserve
    "nce_image_unsafe": 0.50,  # NCE(T0(T), V(V*))    redirect
}
UNSAFE_IMAGE_TERMS = ("image_unsafe", "nce_image_unsafe")  # the terms that need V*


def cosine_distance(a, b):
    """Mean over the batch of 1 - cos(a_i, b_i)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def info_nce(a, b, scale=100.0):
    """Symmetric in-batch InfoNCE: row i of `a` should pick row i of `b` and vice versa."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = scale * a @ b.t()  # (B, B)
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def weighted_total(terms, lambdas):
    """sum(l_i / sum(l) * term_i) over the terms."""
    norm = sum(lambdas[k] for k in terms)
    return sum(lambdas[k] / norm * v for k, v in terms.items())


def safe_clip_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, lambdas=None, has_unsafe_image=None, *, scale=100.0):
    """The Safe-CLIP objective. Returns `(total, terms)`, with `total = sum(l_i / sum(l) * term_i)`
    over the terms present.

    t_safe = T(T), t_unsafe = T(T*), v_safe = V(V), v_unsafe = V(V*): the model being trained.
    t_ref = T0(T), v_ref = V0(V): the original model (constants). All (B, E).
    has_unsafe_image: (B,) bool, for a batch where not every row has V*; `v_unsafe` then holds
    only those rows, (M, E). The terms on V* are computed over them, and left out when M = 0.
    scale: the InfoNCE logit scale (the paper's fixed 100).
    """
    lambdas = {**LAMBDAS, **(lambdas or {})}
    rows = slice(None) if has_unsafe_image is None else has_unsafe_image  # the rows that have V*
    terms = {
        "text_safe": cosine_distance(t_safe, t_ref),
        "text_unsafe": cosine_distance(t_unsafe, t_ref),
        "image_safe": cosine_distance(v_safe, v_ref),
        "image_unsafe": cosine_distance(v_unsafe, v_ref[rows]) if len(v_unsafe) else None,
        "nce_text_safe": info_nce(t_safe, v_ref, scale),
        "nce_text_unsafe": info_nce(t_unsafe, v_ref, scale),
        "nce_image_safe": info_nce(t_ref, v_safe, scale),
        "nce_image_unsafe": info_nce(t_ref[rows], v_unsafe, scale) if len(v_unsafe) else None,
    }
    terms = {k: v for k, v in terms.items() if v is not None}
    return weighted_total(terms, lambdas), terms  # renormalised over the terms present


def active_terms(rows):
    """Each Safe-CLIP term that `rows` give inputs to -> over how many rows it is computed."""
    with_v_unsafe = sum(r["unsafe_image"] is not None for r in rows)
    return {k: with_v_unsafe if k in UNSAFE_IMAGE_TERMS else len(rows) for k in LAMBDAS
            if with_v_unsafe or k not in UNSAFE_IMAGE_TERMS}


def clip_loss(text, image, logit_scale):
    """CLIP's own objective (symmetric InfoNCE, learnable temperature), for pre-training."""
    return info_nce(text, image, scale=logit_scale.exp().clamp(max=100))


# ---------------------------------------------------------------------------------------------
# 7. The data and the frozen targets
# ---------------------------------------------------------------------------------------------
# A row of pairs.jsonl is a quadruplet: a safe caption T, its unsafe twin T*, a safe image V and,
# optionally, its unsafe twin V* (the public datasets publish none). Part II reads and checks the
# file; here a row becomes tensors.
#
# Every target of the objectives comes from the original, frozen model: T0(T), V0(V) and, for
# some objectives, T0(T*), V0(V*) and what is derived from them. They never move, so they are
# computed once, before the first step, instead of running frozen encoders at every step: the
# whole story is "The frozen targets" below, to `frozen_targets`; `bind_objective`, after it, binds
# them, --lambdas and the objective's settings to its loss.


class Quadruplets(torch.utils.data.Dataset):
    """Row i -> (safe pixels, unsafe pixels or None, i); captions are tokenized up front. With
    `cache`, each image is decoded and preprocessed once, in its first epoch, and then kept: on a
    CPU, the demo's steps (48-pixel images) then run ~12% faster. `source` (the data file) names
    the row of an image that cannot be read."""

    def __init__(self, rows, preprocess, cache=False, source="pairs.jsonl"):
        self.rows, self.preprocess, self.source = rows, preprocess, source
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        try:
            unsafe = self.pixels(row["unsafe_image"]) if row["unsafe_image"] else None
            return self.pixels(row["safe_image"]), unsafe, i
        except DataError as e:  # an image that vanished or broke after the run started
            raise DataError(f"{self.source}:{row.get('line', i + 1)}: {e}") from None

    def pixels(self, path):
        if self.cache is None:
            return self.preprocess(open_image(path))
        if path not in self.cache:
            self.cache[path] = self.preprocess(open_image(path))
        return self.cache[path]


def collate_quadruplets(batch):
    """-> safe pixels (B, 3, R, R), the unsafe pixels of the rows that have them (M, 3, R, R),
    which rows those are (B,) bool, and the row indices (B,)."""
    safe, unsafe, idx = zip(*batch)
    present = [u for u in unsafe if u is not None]
    return (torch.stack(safe), torch.stack(present) if present else torch.empty(0, *safe[0].shape),
            torch.tensor([u is not None for u in unsafe]), torch.tensor(idx))


# The frozen targets: what, when, how precise.
# - What: the original model's embeddings of every row (training and validation), not normalised:
#   T0(T) and V0(V) for Safe-CLIP (`t_ref`, `v_ref`); T0(T*), V0(V*) and what is derived from them
#   for some objectives of section 9 (`references_needed`).
# - When: once per run, in `train`, *before* `choose_trainable` attaches any adapter, so the model
#   embedding them is the original one; a step then runs only the model being trained.
# - How precise: true float32, whatever --precision says (no autocast, no TF32: `frozen_embeddings`),
#   since every term pulls toward them and they are computed only once.
# - Under torchrun each rank embeds a stride of the rows and all ranks get all of them
#   (`reference_embeddings`). The only thing Part II adds is a cache: `objective_inputs` keeps the
#   result in OUT/reference.safetensors for a later run on the same weights, data and code.

REFERENCE_INPUTS = {"t_ref": ("safe", "T0(T)"), "v_ref": ("safe_image", "V0(V)"),
                    "t_unsafe_ref": ("unsafe", "T0(T*)"), "v_unsafe_ref": ("unsafe_image", "V0(V*)")}


def references_needed(objective):
    """The frozen embeddings that `objective`'s targets are made of, in REFERENCE_INPUTS' order."""
    spec = OBJECTIVES[objective]
    needs = set(spec.references) | ({"t_unsafe_ref"} if spec.curriculum else set()) | (
        {"t_unsafe_ref", "v_unsafe_ref"} if "unsafe_dir" in spec.constants else set())
    return [name for name in REFERENCE_INPUTS if name in needs]


def frozen_embeddings(model, preprocess, rows, names, device, batch_size, workers=0, desc=True):
    """The original model's embeddings of `rows` in true float32: {name: (N, E)}, on the CPU, not
    normalised, for each of `names` (keys of REFERENCE_INPUTS: T0(T), V0(V), T0(T*), V0(V*)).
    The precision is decided here: precision="fp32" turns off the autocast that `encode_texts` and
    `encode_images` (Part II: they batch the rows and call `encode_text` / `encode_image`) would
    run under, and `true_fp32` turns off TF32, so every matmul is a full float32 one, on any GPU."""
    was_training = model.training
    model.eval()
    out = {}
    with true_fp32():
        for name in names:
            field, label = REFERENCE_INPUTS[name]
            items, bar = [r[field] for r in rows], desc and f"reference {label}"
            out[name] = (encode_images(model, preprocess, items, batch_size, device, desc=bar, workers=workers,
                                       precision="fp32") if field.endswith("image")
                         else encode_texts(model, items, batch_size, device, desc=bar, precision="fp32"))
    model.train(was_training)
    return out


@contextlib.contextmanager
def true_fp32():
    """Float32 matmuls in full float32 within (TF32 off), then the settings as they were."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_embeddings(model, preprocess, rows, device, batch_size, workers, names=("t_ref", "v_ref")):
    """`frozen_embeddings` of every row, the work split over ranks: each embeds a stride of the
    rows, and every rank gets them all."""
    rank, world, _ = dist_info()
    mine = frozen_embeddings(model, preprocess, rows[rank::world], names, device, batch_size, workers, rank == 0)
    return {name: gather_rows(emb, len(rows), rank, world, device) for name, emb in mine.items()}


def frozen_targets(objective, model, preprocess, rows, n_train, device, batch_size, workers=0):
    """Everything `objective` pulls toward, for every row, from `model` as it is (`train` calls this
    before any adapter exists): the frozen embeddings it needs (`references_needed`), then what it
    derives from them once: SafeR-CLIP's nearest safe caption of each row and its curriculum order,
    twin-offset's unsafe direction, twin-gap's modality gap. {name: tensor}. Rows [0, n_train) are the training split, the
    rest validation's; only the training rows are drawn on."""
    # `frozen_embeddings` of every row, each rank embedding a stride of them
    emb = reference_embeddings(model, preprocess, rows, device, batch_size, workers, references_needed(objective))
    spec, out, t_ref = OBJECTIVES[objective], dict(emb), emb["t_ref"]
    if "t_near" in spec.references:  # the pool: every safe caption of the training split
        out["near"] = nearest_safe(emb["t_unsafe_ref"], t_ref[:n_train])
    if spec.curriculum:
        out["order"] = curriculum_order(t_ref[:n_train], emb["t_unsafe_ref"][:n_train])
    if "unsafe_dir" in spec.constants:
        out["unsafe_dir"] = unsafe_direction(torch.cat([t_ref[:n_train], emb["v_ref"][:n_train]]),
                                             torch.cat([emb["t_unsafe_ref"][:n_train], emb["v_unsafe_ref"][:n_train]]))
    if "gap_dir" in spec.constants:
        out["gap_dir"] = modality_gap(t_ref[:n_train], emb["v_ref"][:n_train])
    return out


def objective_arguments(objective, targets):
    """`frozen_targets`' result -> what the loss takes: (per-row references {name: (N, ..)},
    constants {name: tensor}, curriculum order or None)."""
    spec = OBJECTIVES[objective]
    per_row = {"t_near": lambda: targets["t_ref"][targets["near"]], "v_near": lambda: targets["v_ref"][targets["near"]]}
    refs = {name: per_row[name]() if name in per_row else targets[name] for name in spec.references}
    return refs, {name: targets[name] for name in spec.constants}, targets.get("order")


def bind_objective(config, targets, n_train, logit_scale):
    """The run's loss and what it takes per row: (loss_fn, {"train": refs, "val": refs}, curriculum
    order or None). loss_fn is `config.objective`'s function (OBJECTIVES) with these bound: the
    weights (--lambdas, or the objective's own), the InfoNCE scale (--nce-scale: a number, or
    "model" for the original model's own exp(logit_scale); default the paper's 100), the
    objective's settings that were given (--offset, --margin, --margin-tau; else its defaults) and
    its constants from `targets` (twin-offset's and twin-gap's directions). refs: its per-row frozen references
    (`frozen_targets`' result), split at n_train. --objective clip: (None, no refs, None), which
    `batch_loss` reads as CLIP's own loss."""
    if config.objective == "clip":
        return None, {"train": {}, "val": {}}, None
    per_row, constants, order = objective_arguments(config.objective, targets)
    given = {"offset": config.offset, "margin": config.margin, "tau": config.margin_tau}
    constants = {name: value.to(logit_scale.device) for name, value in constants.items()}  # once, not each step
    constants |= {name: value for name, value in given.items() if value is not None}
    constants["scale"] = logit_scale.exp().item() if config.nce_scale == "model" else float(config.nce_scale or 100)
    loss_fn = functools.partial(OBJECTIVES[config.objective].loss, lambdas=config.lambdas, **constants)
    refs = {"train": {k: v[:n_train] for k, v in per_row.items()}, "val": {k: v[n_train:] for k, v in per_row.items()}}
    return loss_fn, refs, order


# ---------------------------------------------------------------------------------------------
# 8. Exact resume, one training step, and the loop
# ---------------------------------------------------------------------------------------------
# In order: what a run's state is, the things every step depends on, and how a checkpoint holds it
# (exact resume); which rows a step trains on and how they arrive (`Schedule`, `MicroBatch`); the
# step itself (`embed`, `batch_loss`, `forward_backward` or, with --accum, `accumulate`, then
# `update` at `lr_at`'s learning rate); and `train`, which runs it all.

# -- exact resume ------------------------------------------------------------------------------
# A run stopped at step N and resumed with --resume equals a straight run of the same steps, bit
# for bit (on the same kernels, and with the same --epochs/--steps, which a cosine schedule's lr
# depends on), because the checkpoint (OUT/checkpoint.pt, `training_state` below) holds everything
# the next step depends on:
# - the trainable tensors (the adapters, unmerged), AdamW's moments and step counts, the fp16 loss
#   scaler, and the progress: the step and the best validation so far;
# - the generators a step draws from, on every rank: torch's CPU generator and the current CUDA
#   device's, which draw the dropout masks (each rank its own, seeded seed + rank).
# The data position is the step itself: the order of any step follows from the seed and the step
# (`Schedule`, below), and the loader (`training_steps`, Part II) starts at the restored step.
# Everything else that draws random numbers has a private generator, so it never moves the ones
# dropout draws from: the data order's (`Schedule.batches`: seed + epoch), the DataLoader's
# (`loader_rng` in `train`: seed) and validation's image loader's (a fresh `torch.Generator()` in
# `encode_images`, Part II). Were they shared, a validation or a worker's start would shift every
# later dropout mask, and a resumed run, which validates at other moments, would differ. The run
# writes the checkpoint at every epoch's end, every --save-every steps, and when it stops (early, by
# a signal, or at the end), never after a non-finite loss, which stops the run with the last good
# checkpoint in place; `Checkpoint` (Part II) only writes this state to the file atomically and
# reads it back, and `train` passes what it read to `restore_training_state` before the first step.

def training_state(trainable, optimizer, scaler, progress):
    """What a checkpoint holds: {trainable, optimizer, scaler, rng, cuda_rng, rng_ranks, state}, on
    rank 0 (None on the others). `progress`: the step and the best validation. Every rank calls it:
    each sends its own generators, the ones its dropout draws from (`all_ranks`, Part II: [its own]
    in a single process)."""
    rng_of_ranks = all_ranks(_rng_state())  # [(cpu, cuda) of rank 0, of rank 1, ...]
    if dist_info()[0] != 0:
        return None
    rng, cuda_rng = rng_of_ranks[0]
    return dict(trainable={n: p.detach().cpu() for n, p in trainable.items()}, optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), rng=rng, rng_ranks=rng_of_ranks, state=dict(progress),
                cuda_rng=cuda_rng if cuda_rng is not None else torch.empty(0, dtype=torch.uint8))


def restore_training_state(ckpt, trainable, optimizer, scaler, rank):
    """Put `training_state`'s result back in place, with this rank's generators; returns the progress."""
    with torch.no_grad():
        for name, value in ckpt["trainable"].items():
            trainable[name].copy_(value)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when the run so far was not fp16: the scale starts afresh
        scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt.get("rng_ranks") or [(ckpt["rng"], ckpt["cuda_rng"] if len(ckpt["cuda_rng"]) else None)]
    _set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    return ckpt["state"]


def _rng_state():
    """The generators dropout draws from (the CPU's, and the current CUDA device's if in use):
    `accumulate` replays them, and a checkpoint saves them (exact resume, above)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


def _set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state[1])


# -- one training step ----------------------------------------------------------------------
# A step runs the text tower once over the safe and unsafe captions together and the vision tower
# once over the safe and unsafe images together, gathers the embeddings over ranks, computes
# every term of the objective from them, and takes one optimizer step. Mixed precision (AMP) is
# the same code on every device; on CUDA it is bf16 by default.
# The step's defaults (`TrainConfig`, section 1) for --objective safeclip: AdamW, lr 1e-3 (LoRA; 1e-5
# --full), weight decay 0, constant schedule, warm-up 0, grad clip 1.0, batch 16, accum 1, epochs 10,
# seed 0; LoRA rank 16, alpha 1, dropout 0.1, on both towers; precision bf16 on CUDA, fp32 on the CPU.

# -- which rows a step trains on, and how they arrive ----------------------------------------
# The data order: each epoch is a permutation drawn from a generator of its own, seeded with
# seed + epoch, so the order of any step is known from the step alone (a resumed run needs no data
# state, and every rank knows the whole batch without asking the others).

class Schedule:
    """Which rows each step trains on. An epoch is a seeded permutation of its rows (all training
    rows, or a curriculum's share of them) cut into global batches of batch x accum rows; the
    rows left over at an epoch's end (fewer than a step's) sit that epoch out, and the next epoch
    draws a new permutation of all of them."""

    def __init__(self, n_rows, batch, accum, seed, order=None):
        self.n_rows, self.batch, self.accum, self.seed, self.order = n_rows, batch, accum, seed, order

    def rows(self, epoch):
        return torch.arange(self.n_rows) if self.order is None else curriculum_rows(self.order, epoch)

    def steps_in(self, epoch):
        return len(self.rows(epoch)) // (self.batch * self.accum)

    def total(self, epochs):
        return sum(self.steps_in(epoch) for epoch in range(epochs))

    def locate(self, step):
        """(epoch, steps already done in it) of a global step."""
        epoch = 0
        while step >= self.steps_in(epoch):
            step, epoch = step - self.steps_in(epoch), epoch + 1
        return epoch, step

    def batches(self, epoch):
        """(steps x accum, batch) row indices: the micro-batches of every step of `epoch`, in order."""
        rows, steps = self.rows(epoch), self.steps_in(epoch)
        shuffled = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed + epoch))]
        return shuffled[: steps * self.batch * self.accum].view(steps * self.accum, self.batch)


# Each step's rows arrive as --accum `MicroBatch`es: `training_steps` (Part II, section 16) runs one
# DataLoader for the whole run that loads this rank's share of every micro-batch of `Schedule.batches`
# (under torchrun rank r takes every world-th row from r on, `rank_shares`), and adds the rows of every
# rank, which each rank knows from the seed and the step without asking the others.

class MicroBatch(NamedTuple):
    """One micro-batch as `embed` takes it: this rank's b rows, loaded and collated
    (`collate_quadruplets`), then the B rows of every rank."""

    safe_pix: torch.Tensor  # (b, 3, R, R): V of this rank's rows
    unsafe_pix: torch.Tensor  # (m, 3, R, R): V* of the m of them that have one
    has_v_unsafe: torch.Tensor  # (b,) bool: which of this rank's rows have V*
    idx: torch.Tensor  # (b,) this rank's rows: indices into the training rows
    rows: torch.Tensor  # (B,) the rows of every rank, in the order `gather` returns their embeddings
    has_all: torch.Tensor  # (B,) bool: which of those have V*


# -- the step: forward, loss, backward, update ----------------------------------------------

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision=None):
    """Autocast to `precision` ("bf16" or "fp16"; "fp32" turns it off) on any device, so a CPU runs
    the same mixed-precision code as a GPU. Matmuls and attention run in the low precision; the
    weights, LayerNorm's statistics (see LayerNorm), the loss and the optimizer stay float32.
    Default: bf16 on CUDA; float32 on the CPU, where bf16 pays only with native bf16 instructions."""
    device = torch.device(device)
    dtype = PRECISIONS[precision or ("bf16" if device.type == "cuda" else "fp32")]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class Towers(nn.Module):
    """The fused forward pass: both captions through the text tower in one batch, both images
    through the vision tower in another. A frozen tower runs without building a graph.
    (A module of its own so DistributedDataParallel can wrap it.) Build it after deciding what
    trains: which towers do is read once, here, not at every step."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.text_trains = any(p.requires_grad for p in model.transformer.parameters())
        self.vision_trains = any(p.requires_grad for p in model.visual.parameters())

    def forward(self, ids, pixels):
        with torch.set_grad_enabled(self.text_trains and torch.is_grad_enabled()):
            text = self.model.encode_text(ids)
        with torch.set_grad_enabled(self.vision_trains and torch.is_grad_enabled()):
            image = self.model.encode_image(pixels)
        return text, image


# -- distributed helpers: no-ops in a single process ------------------------------------------


def gather(x):
    """Concatenate `x` from all ranks, keeping gradients, so InfoNCE sees the global batch's
    negatives. Every rank then computes the same global loss; the backward sums the gradients of
    all ranks' copies of that loss, and DDP's average over ranks undoes that sum."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    return _AllGather.apply(x)  # (Part II)


def embed(towers, ids, refs, device, precision, batch):
    """A micro-batch -> the embeddings [T, T*, V, V*, which rows have V*] of the rows of every rank
    (V* only for those rows; None when all have one), and those rows' frozen references. `ids`
    holds the (safe, unsafe) token ids of the training rows, `refs` their references, on `device`.
    Every shape is decided from host data (the batch's rows), so nothing here waits for the GPU.
    `batch`: a `MicroBatch` (section 8): this rank's pixels and rows, and the rows of every rank."""
    safe_pix, unsafe_pix, has_v_unsafe, idx, rows, has_all = batch
    t_ids = trim_padding(torch.cat([ids[0][idx], ids[1][idx]]))  # on the CPU
    pixels = torch.cat([safe_pix.to(device, non_blocking=True), unsafe_pix.to(device, non_blocking=True)])
    with autocast(device, precision):
        text, image = towers(to_device(t_ids, device), pixels)  # (only the V* that exist)
    t_safe, t_unsafe = text.float().chunk(2)
    v_safe, v_unsafe = image.float().split([len(idx), len(unsafe_pix)])
    v_unsafe = gather_some(v_unsafe, has_v_unsafe, has_all)
    has = None if has_all.all() else has_all
    rows = to_device(rows, device)  # once for every reference
    row_refs = {k: v.index_select(0, rows) for k, v in refs.items()}
    return [gather(t_safe), gather(t_unsafe), gather(v_safe), v_unsafe, has], row_refs


def trim_padding(ids, multiple=8):
    """Token ids (B, L) cut after the batch's last EOT, rounded up to a multiple of `multiple`: the
    same embeddings (the causal mask makes a caption's output at EOT blind to what follows), less
    work, and under --compile a few lengths that each compile once."""
    n = int(ids.argmax(dim=-1).max()) + 1
    return ids[:, : min(ids.shape[1], -(-n // multiple) * multiple)]


def batch_loss(loss_fn, logit_scale, emb, refs):
    """The loss of a batch from its embeddings and its rows' frozen references: (total, terms).
    `loss_fn` is the objective with its settings bound; None is CLIP's own loss (pre-training),
    over every caption-image pair the batch holds."""
    t_safe, t_unsafe, v_safe, v_unsafe, has_v_unsafe = emb
    if loss_fn is None:
        t_paired = t_unsafe if has_v_unsafe is None else t_unsafe[has_v_unsafe]
        return clip_loss(torch.cat([t_safe, t_paired]), torch.cat([v_safe, v_unsafe]), logit_scale), {}
    return loss_fn(t_safe, t_unsafe, v_safe, v_unsafe, has_unsafe_image=has_v_unsafe, **refs)


def forward_backward(micro_batches, embed_batch, loss_of, scaler, no_sync=None):
    """The loss of one optimizer step's batch and its gradients in the parameters' .grad:
    (loss, terms). `embed_batch` and `loss_of` are `embed` and `batch_loss` with the run's
    settings bound."""
    if len(micro_batches) > 1:
        return accumulate(micro_batches, embed_batch, loss_of, scaler, no_sync)
    loss, terms = loss_of(*embed_batch(micro_batches[0]))
    scaler.scale(loss).backward()  # fp16: scaled up, so small gradients do not underflow
    return loss, terms


def accumulate(micro_batches, embed_batch, loss_of, scaler, no_sync=None):
    """--accum N as one batch N times larger, as open_clip's --accum-freq does it: embed every
    micro-batch without a graph, compute the whole batch's loss on those embeddings, then
    recompute each micro-batch with its graph against the others' cached embeddings and
    backpropagate. The gradients add up to the whole batch's, InfoNCE negatives included, for
    one more forward pass per micro-batch and the memory of one micro-batch's graph. (The same
    batch, not the same numbers as --batch-size B x N: each micro-batch draws its own dropout
    masks, and its captions are trimmed to its own longest.) `no_sync` (DDP's) holds back the
    gradient all-reduce until the last micro-batch.

    Why the sum is the whole batch's gradient: the loss L depends on the parameters only through the
    embeddings e_1..e_N of the N micro-batches (InfoNCE couples them all), so by the chain rule
    dL/dtheta = sum_j dL/de_j . de_j/dtheta. Pass j recomputes e_j with its graph, the others as
    constants (cached, no graph), and backpropagates L: that gives exactly the j-th summand, and
    .grad adds the N of them up. Replaying pass j's generator state (`_rng_state`) draws the same
    dropout masks as the cached pass, so the recomputed e_j equals the cached one."""
    rng, cached, refs = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng.append(_rng_state())  # the recomputation replays these dropout masks
            emb, r = embed_batch(batch)
            cached.append(emb)
            refs.append(r)
        refs = {k: torch.cat([r[k] for r in refs]) for k in refs[0]}
        loss, terms = loss_of(concat_embeddings(cached), refs)
    for j, batch in enumerate(micro_batches):
        _set_rng_state(rng[j])
        last = j == len(micro_batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            emb = list(cached)
            emb[j] = embed_batch(batch)[0]
            scaler.scale(loss_of(concat_embeddings(emb), refs)[0]).backward()
    return loss, terms


def concat_embeddings(micro):
    """Micro-batches' [T, T*, V, V*, has V*] -> one batch's (the mask None again when all have V*)."""
    has = [torch.ones(len(e[0]), dtype=torch.bool) if e[4] is None else e[4] for e in micro]
    has = torch.cat(has)
    return [torch.cat([e[i] for e in micro]) for i in range(4)] + [None if has.all() else has]


def update(optimizer, scaler, params, grad_clip):
    """Clip the gradients' norm (unscaled first under fp16), step, clear the gradients. Returns the
    loss scale the step used: under fp16 a step with non-finite gradients is skipped and the
    scale halved, which is how a caller sees a skip."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale


def lr_at(step, config, total_steps):
    """Linear warmup, then constant or cosine decay to zero."""
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    if config.schedule == "cosine":
        return config.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr * warm


def train(config):
    """Fine-tune a CLIP with `config.objective` (or, with --objective clip --scratch, pre-train one)
    into the folder config.out; returns the trained model. Reading the data and the weights, the
    devices and the targets' cache are functions of Part II; the folder's
    bookkeeping (log, validation, checkpoints, resume, signals) is the `Run`'s."""
    # -- set-up ---------------------------------------------------------------------------------
    device, (rank, world, _) = setup_device(config), dist_info()
    torch.manual_seed(config.seed)  # adapters' initialisation and dropout; data order has its own generator
    with Run(config, main_process=rank == 0) as run:  # refuses a folder that holds a run, unless --resume
        train_rows, val_rows, skipped = training_rows(config, world, verbose=rank == 0)
        model, preprocess, model_path = initial_model(config, train_rows)
        model.to(device)
        ctx = model.config.context_length
        ids = {split: (model.tokenizer([r["safe"] for r in rows], context_length=ctx),
                       model.tokenizer([r["unsafe"] for r in rows], context_length=ctx))
               for split, rows in (("train", train_rows), ("val", val_rows))}
        # The frozen targets T0(T), V0(V) (and what the objective derives from them), from the original
        # weights: before any adapter exists. Once per weights, data and code: a later run reads them
        # from OUT/reference.safetensors (`objective_inputs`, Part II).
        rows, n_train = train_rows + val_rows, len(train_rows)
        targets = {} if config.objective == "clip" else objective_inputs(  # (CLIP's own loss takes none)
            lambda: frozen_targets(config.objective, model, preprocess, rows, n_train, device, config.batch_size,
                                   config.workers),
            Path(config.out) / "reference.safetensors", _fingerprint(model_path, rows, model, config.objective, n_train),
            write=run.write)
        loss_fn, refs, order = bind_objective(config, targets, n_train, model.logit_scale)

        choose_trainable(model, config)  # LoRA adapters (the default), or whole towers
        if world > 1:  # the same adapters everywhere, but each rank its own dropout masks
            torch.manual_seed(config.seed + rank)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(trainable.values(), lr=config.lr, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")
        towers = Towers(model)
        if distributed():
            towers = nn.parallel.DistributedDataParallel(towers, device_ids=[device] if device.type == "cuda" else None)
        # fp16's narrow range needs the loss scaled up before backward; a step whose gradients
        # overflow anyway is skipped and the scale halved. bf16 has float32's range and needs none.
        scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        embed_batch = functools.partial(embed, torch.compile(towers) if config.compile else towers, ids["train"],
                                        {k: v.to(device) for k, v in refs["train"].items()}, device, config.precision)
        loss_of = functools.partial(batch_loss, loss_fn, model.logit_scale)
        no_sync = towers.no_sync if world > 1 else None
        schedule = Schedule(len(train_rows), config.batch_size, config.accum, config.seed, order)
        total_steps = config.steps or schedule.total(config.epochs)
        validation = lambda: validate(model, val_rows, ids["val"], preprocess, refs["val"], loss_fn, config, device)
        # Exact resume (above): with --resume, everything the next step depends on comes back from
        # the checkpoint, and the run goes on from its step.
        saved = run.saved_state(trainable)  # (None: a fresh run)
        resumed_at = None if saved is None else restore_training_state(saved, trainable, optimizer, scaler, rank)
        run.begin(model, trainable, optimizer, scaler, schedule, total_steps, train_rows, loss_fn,
                  validation if val_rows else lambda: None, device, resumed_at)
        # Decoded images are kept when they fit in --image-cache and are loaded in this process (each
        # worker would keep a copy of its own).
        cache = config.workers == 0 and image_cache_mib(train_rows, model.config.image_resolution) <= config.image_cache
        dataset = Quadruplets(train_rows, preprocess, cache=cache, source=config.data)

        # -- the loop ---------------------------------------------------------------------------
        towers.train()
        loader_rng = torch.Generator().manual_seed(config.seed)  # the loader's own (its workers' seeds): see resume
        with training_steps(dataset, schedule, run.step, total_steps, config.workers, loader_rng, device) as steps:
            for micro_batches in steps:  # one optimizer step's --accum micro-batches, from run.step on
                epoch = schedule.locate(run.step)[0]
                lr = lr_at(run.step, config, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, terms = forward_backward(micro_batches, embed_batch, loss_of, scaler, no_sync)
                scale = update(optimizer, scaler, trainable.values(), config.grad_clip)
                if config.objective == "clip":  # CLIP's own temperature, capped at 100 as OpenAI's is
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, math.log(100))
                if run.after_step(epoch, lr, loss, terms, scale):  # log, validate, checkpoint; True: stop here
                    break

        # -- finish: the best model by validation (or the last) is saved as OUT, merged (section 4) --
        run.finish(model, skipped)
    if distributed():  # DDP holds the process group: drop it before the group's teardown (Part II)
        del towers, embed_batch, no_sync
        end_process_group()
    return model


# ---------------------------------------------------------------------------------------------
# 9. Beyond the paper: SafeR-CLIP, twin-offset, twin-margin, twin-nce and twin-gap
# ---------------------------------------------------------------------------------------------
# Safe-CLIP is all above; a first reading can stop here. What follows are more objectives with
# `safe_clip_loss`'s signature, on the same data and loop. What they need beyond T0(T) and V0(V)
# (T0(T*), V0(V*), a nearest safe caption, a curriculum, an unsafe direction, the modality gap) is
# computed once from the frozen embeddings in `frozen_targets` (section 7). `OBJECTIVES`, at the
# end, names them all for --objective.

# SafeR-CLIP (Yousaf et al., AAAI 2026), as far as its project page, poster and slides show it:
# the unsafe inputs go to the *nearest* safe item under the frozen model (t_near = T0(t^), v_near =
# V0(v^), where t^ is the training split's safe caption closest to T0(T*)), and the unsafe
# InfoNCE terms become "relative" ones whose only negative is the input's own unsafe twin, with no
# temperature. The preserve terms are Safe-CLIP's. INFERRED here (unpublished): the weights, which
# reuse Safe-CLIP's for the matching terms.
SAFER_LAMBDAS = {
    "text_safe": 0.10,  # d(T(T), T0(T))                                        preserve
    "text_unsafe": 0.10,  # d(T(T*), T0(t^))                                    redirect
    "image_safe": 0.10,  # d(V(V), V0(V))                                       preserve
    "image_unsafe": 0.20,  # d(V(V*), V0(v^))                                   redirect
    "nce_text_safe": 0.25,  # NCE(T(T), V0(V))                                  preserve
    "rel_text_unsafe": 0.25,  # softplus(cos(T(T*), V0(V*)) - cos(T(T*), V0(v^)))  redirect
    "nce_image_safe": 0.25,  # NCE(T0(T), V(V))                                 preserve
    "rel_image_unsafe": 0.50,  # softplus(cos(V(V*), T0(T*)) - cos(V(V*), T0(t^)))  redirect
}


def _require_unsafe_images(has_unsafe_image, objective):
    """safer-clip and twin-offset need V* on every row (rows without one: --objective safeclip)."""
    if has_unsafe_image is not None and not bool(has_unsafe_image.all()):
        raise DataError(f"--objective {objective} needs an unsafe image on every row; rows without one "
                        "train with --objective safeclip")


def relative_loss(x, unsafe_target, safe_target):
    """Mean of softplus(cos(x, unsafe_target) - cos(x, safe_target)): prefer the safe target to
    the unsafe one, with the unsafe one as the only negative."""
    x = x.float()
    return F.softplus(F.cosine_similarity(x, unsafe_target.float(), dim=-1)
                      - F.cosine_similarity(x, safe_target.float(), dim=-1)).mean()


def safer_clip_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, lambdas=None, has_unsafe_image=None, *,
                    t_unsafe_ref, v_unsafe_ref, t_near, v_near, scale=100.0):
    """The SafeR-CLIP objective. Returns `(total, terms)` like `safe_clip_loss`.

    t_unsafe_ref = T0(T*), v_unsafe_ref = V0(V*); t_near = T0(t^), v_near = V0(v^): the nearest
    safe caption of the training split and the image of its row. All (B, E) constants.
    """
    _require_unsafe_images(has_unsafe_image, "safer-clip")
    lambdas = {**SAFER_LAMBDAS, **(lambdas or {})}
    terms = {
        "text_safe": cosine_distance(t_safe, t_ref),
        "text_unsafe": cosine_distance(t_unsafe, t_near),
        "image_safe": cosine_distance(v_safe, v_ref),
        "image_unsafe": cosine_distance(v_unsafe, v_near),
        "nce_text_safe": info_nce(t_safe, v_ref, scale),
        "rel_text_unsafe": relative_loss(t_unsafe, v_unsafe_ref, v_near),
        "nce_image_safe": info_nce(t_ref, v_safe, scale),
        "rel_image_unsafe": relative_loss(v_unsafe, t_unsafe_ref, t_near),
    }
    return weighted_total(terms, lambdas), terms


# twin-offset (ours, beyond both papers). Safe-CLIP lands an unsafe item exactly on its safe
# twin, so in a gallery holding both they tie, for unsafe *and* safe queries. twin-offset lands it
# on the twin plus a step along an "unsafe" direction u that the safe data hardly use (the one in
# which the frozen unsafe embeddings exceed the safe ones most, computed once), with opposite
# signs for text and images:
#     T(T*) -> normalize(T0(T) + a u),      V(V*) -> normalize(V0(V) - a u).
# For a safe item x (x . u ~ 0) every cosine with an unsafe item is then its cosine with the
# twin times 1/sqrt(1 + a^2): a safe query ranks each unsafe item just below its safe twin, and
# the ranking among safe items is unchanged. Between an unsafe caption and an unsafe image the
# offsets cancel (cos -> (c - a^2) / (1 + a^2)), so unsafe queries rank unsafe items lower still.
# The redirect InfoNCE terms see only the component orthogonal to u, so they align the unsafe
# item with its twin's partner without fighting the offset. u . x is also an unsafe-content score.
TWIN_OFFSET = 1.0  # a: the offset's length (chosen by measurement, see docs/objectives.md)
TWIN_OFFSET_LAMBDAS = dict(LAMBDAS)  # Safe-CLIP's weights for the same eight terms


def twin_offset_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, lambdas=None, has_unsafe_image=None, *, unsafe_dir, offset=TWIN_OFFSET, scale=100.0):
    """The twin-offset objective. Returns `(total, terms)` like `safe_clip_loss`; the unsafe
    targets are offset along `unsafe_dir` (E,), +offset for text, -offset for images."""
    _require_unsafe_images(has_unsafe_image, "twin-offset")
    lambdas = {**TWIN_OFFSET_LAMBDAS, **(lambdas or {})}
    u = F.normalize(unsafe_dir.float().to(t_ref.device), dim=-1)
    t_target = F.normalize(F.normalize(t_ref.float(), dim=-1) + offset * u, dim=-1)
    v_target = F.normalize(F.normalize(v_ref.float(), dim=-1) - offset * u, dim=-1)

    def off_u(x):  # the part of x in the safe subspace
        x = F.normalize(x.float(), dim=-1)
        return x - (x @ u)[:, None] * u

    terms = {
        "text_safe": cosine_distance(t_safe, t_ref),
        "text_unsafe": cosine_distance(t_unsafe, t_target),
        "image_safe": cosine_distance(v_safe, v_ref),
        "image_unsafe": cosine_distance(v_unsafe, v_target),
        "nce_text_safe": info_nce(t_safe, v_ref, scale),
        "nce_text_unsafe": info_nce(off_u(t_unsafe), v_ref, scale),
        "nce_image_safe": info_nce(t_ref, v_safe, scale),
        "nce_image_unsafe": info_nce(t_ref, off_u(v_unsafe), scale),
    }
    return weighted_total(terms, lambdas), terms


# twin-margin (ours, beyond both papers). Where twin-offset fixes the direction in which the
# unsafe twin steps aside in advance, twin-margin lets the model choose it, by ranking the twins
# directly: Safe-CLIP's eight terms, plus hinge terms in which the only negative of a query is its
# row's own unsafe twin, as embedded by the model being trained (as an index would embed it):
#     caption queries T(T), T(T*) must score V(V) above V(V*) by a margin m,
#     image queries   V(V), V(V*) must score T(T) above T(T*) by m,
# each as tau * softplus((cos(q, unsafe twin) - cos(q, safe twin) + m) / tau): a hinge with its
# corner smoothed over tau. Safe-CLIP's terms pull an unsafe item onto its safe twin; these hold
# it just below. Rows without V* give only the term with no V* in it (V(V) ranking T(T) over T(T*)).
TWIN_MARGIN = 0.3  # m, in cosine (chosen by measurement, see docs/objectives.md)
TWIN_MARGIN_TAU = 0.05  # tau: the smoothing of the hinge's corner
TWIN_MARGIN_LAMBDAS = {**LAMBDAS, "text_safe": 1.0, "image_safe": 1.0, "nce_text_safe": 1.0, "nce_image_safe": 1.0,
                       "rank_text_safe": 2.0, "rank_text_unsafe": 2.0, "rank_image_safe": 2.0, "rank_image_unsafe": 2.0}


def soft_hinge(x, tau):
    """Mean of tau * softplus(x / tau): max(x, 0) with its corner smoothed over tau."""
    return (tau * F.softplus(x / tau)).mean()


def twin_rank(query, safe, unsafe, margin, tau):
    """Mean over rows of tau * softplus((cos(query, unsafe) - cos(query, safe) + margin) / tau)."""
    query, safe, unsafe = (F.normalize(x.float(), dim=-1) for x in (query, safe, unsafe))
    gap = (query * unsafe).sum(-1) - (query * safe).sum(-1)
    return soft_hinge(gap + margin, tau)


def twin_margin_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, lambdas=None, has_unsafe_image=None, *,
                     margin=TWIN_MARGIN, tau=TWIN_MARGIN_TAU, scale=100.0):
    """The twin-margin objective. Returns `(total, terms)` like `safe_clip_loss`, whose eight terms
    it includes; `v_unsafe` holds the rows where `has_unsafe_image` (all when None)."""
    lambdas = {**TWIN_MARGIN_LAMBDAS, **(lambdas or {})}
    _, terms = safe_clip_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, has_unsafe_image=has_unsafe_image,
                              scale=scale)
    rows = slice(None) if has_unsafe_image is None else has_unsafe_image  # the rows that have V*
    if len(v_unsafe):
        terms["rank_text_safe"] = twin_rank(t_safe[rows], v_safe[rows], v_unsafe, margin, tau)
        terms["rank_text_unsafe"] = twin_rank(t_unsafe[rows], v_safe[rows], v_unsafe, margin, tau)
        terms["rank_image_unsafe"] = twin_rank(v_unsafe, t_safe[rows], t_unsafe[rows], margin, tau)
    terms["rank_image_safe"] = twin_rank(v_safe, t_safe, t_unsafe, margin, tau)
    return weighted_total(terms, lambdas), terms


# twin-nce (ours, beyond both papers; issue #34). twin-margin breaks the tie but moves each unsafe
# caption off its own safe image (T*->V, Safe-CLIP's redirect, falls below the toy CLIP's): its
# hinge for a *safe* image query, V(V) scoring T(T) above T(T*), pushes T(T*) away from V(V) by a
# matched pair's whole cosine, and its redirect InfoNCE terms, which pull T(T*) onto V0(V) and
# V(V*) onto T0(T), also pull the two unsafe items onto each other, against the hinges. So:
#   - the redirect InfoNCE terms see the unsafe twin as one more negative of the unsafe query:
#     T(T*) picks V0(V) among the safe images *and its own V(V*)*, V(V*) picks T0(T) among the
#     safe captions and its own T(T*); the term that redirects an unsafe item also holds it off
#     the other unsafe item;
#   - the hinges for safe queries (T(T) ranks V(V) over V(V*), V(V) ranks T(T) over T(T*)) move
#     only the safe items: the unsafe item is a constant there (detached), so the safe side steps
#     away from it instead of pushing it off its redirect target;
#   - the hinge for unsafe captions weighs twice the others (4): in the measurements it was the
#     one left short (T*->V+V*).
TWIN_NCE_MARGIN = 0.3  # m, in cosine, as twin-margin's (see docs/objectives.md)
TWIN_NCE_TAU = 0.05  # tau: the smoothing of the hinge's corner
TWIN_NCE_LAMBDAS = {**TWIN_MARGIN_LAMBDAS, "nce_text_unsafe": 1.0, "nce_image_unsafe": 1.0, "rank_text_unsafe": 4.0}


def twin_info_nce(queries, gallery, twins, has_twin=None, scale=100.0):
    """Symmetric InfoNCE between `queries` and `gallery` (both (N, E), row i with row i), where
    query i also meets its own unsafe twin as one more negative: `twins` (M, E) holds the twins of
    the rows where `has_twin` (N,) bool (all rows when None); a row without one has no such negative."""
    q, g = F.normalize(queries.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    logits = scale * q @ g.t()  # (N, N)
    if has_twin is None:  # every row has its twin
        twin = scale * (q * F.normalize(twins.float(), dim=-1)).sum(-1, keepdim=True)
    else:
        twin = torch.full((len(q), 1), float("-inf"), device=q.device)  # exp(-inf) = 0: no twin, no negative
        twin[has_twin] = scale * (q[has_twin] * F.normalize(twins.float(), dim=-1)).sum(-1, keepdim=True)
    labels = torch.arange(len(q), device=q.device)
    return (F.cross_entropy(torch.cat([logits, twin], 1), labels) + F.cross_entropy(logits.t(), labels)) / 2


def twin_nce_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, lambdas=None, has_unsafe_image=None, *,
                  margin=TWIN_NCE_MARGIN, tau=TWIN_NCE_TAU, scale=100.0):
    """The twin-nce objective. Returns `(total, terms)` like `safe_clip_loss`: its eight terms, the
    two redirect InfoNCE terms with the twin as a negative, and twin-margin's four hinges, those
    of safe queries with the unsafe twin detached; `v_unsafe` holds the rows where
    `has_unsafe_image` (all when None)."""
    lambdas = {**TWIN_NCE_LAMBDAS, **(lambdas or {})}
    _, terms = safe_clip_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, has_unsafe_image=has_unsafe_image,
                              scale=scale)
    rows = slice(None) if has_unsafe_image is None else has_unsafe_image  # the rows that have V*
    terms["nce_text_unsafe"] = twin_info_nce(t_unsafe, v_ref, v_unsafe, has_unsafe_image, scale)
    if len(v_unsafe):
        terms["nce_image_unsafe"] = twin_info_nce(v_unsafe, t_ref[rows], t_unsafe[rows], scale=scale)
        terms["rank_text_safe"] = twin_rank(t_safe[rows], v_safe[rows], v_unsafe.detach(), margin, tau)
        terms["rank_text_unsafe"] = twin_rank(t_unsafe[rows], v_safe[rows], v_unsafe, margin, tau)
        terms["rank_image_unsafe"] = twin_rank(v_unsafe, t_safe[rows], t_unsafe[rows], margin, tau)
    terms["rank_image_safe"] = twin_rank(v_safe, t_safe, t_unsafe.detach(), margin, tau)
    return weighted_total(terms, lambdas), terms


# twin-gap (ours, beyond both papers; issue #34). twin-offset's idea, a step aside that the safe
# items do not see, asked as a margin and along a direction the towers already use: the modality
# gap g = normalize(mean T0(T) - mean V0(V)) (unit embeddings of the training rows, computed once),
# the direction from CLIP's images to its captions. Safe-CLIP's eight terms redirect each unsafe
# item onto its safe twin; three more terms set it aside from that twin along g, in opposite
# directions for the two modalities:
#     gap_text   T(T*) . g >= T(T) . g + a      (an unsafe caption further from every image)
#     gap_image  V(V*) . g <= V(V) . g - a      (an unsafe image further from every caption)
# each as tau * softplus(x / tau) of the shortfall (a hinge with its corner smoothed), with the
# safe item a constant there (detached): the unsafe item moves, not its twin. On their own these
# open the whole gap, safe items included, which costs safe retrieval; so
#     gap_hold   (T(T) . g - T0(T) . g)^2 + (V(V) . g - V0(V) . g)^2
# holds every safe item's component along g where the original model put it. Every image has about
# the same component along g, and so does every caption: a step along g lowers an unsafe item's
# cosine with every query of the other modality by about the same amount, so the order among safe
# items (the redirect, T*->V) is kept while each unsafe item ranks just below its twin. Why the gap, why a hinge and why the hold: docs/objectives.md ("A step aside
# along the modality gap"); benchmarks/target_geometry.py scores these targets met exactly.
TWIN_GAP = 0.1  # a, in cosine along g (chosen by measurement, see docs/objectives.md)
TWIN_GAP_TAU = 0.02  # tau: the smoothing of the hinge's corner
TWIN_GAP_LAMBDAS = {**LAMBDAS, "text_safe": 1.0, "image_safe": 1.0, "nce_text_safe": 1.0, "nce_image_safe": 1.0,
                    "gap_text": 1.0, "gap_image": 4.0, "gap_hold": 4.0}


def component_along(x, direction):
    """(N,) component of each unit row of `x` along the unit vector `direction`."""
    return F.normalize(x.float(), dim=-1) @ direction


def twin_gap_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, lambdas=None, has_unsafe_image=None, *,
                  gap_dir, offset=TWIN_GAP, tau=TWIN_GAP_TAU, scale=100.0):
    """The twin-gap objective. Returns `(total, terms)` like `safe_clip_loss`, whose eight terms it
    includes; `gap_dir` (E,) is g; `v_unsafe` holds the rows where `has_unsafe_image` (all when None)."""
    lambdas = {**TWIN_GAP_LAMBDAS, **(lambdas or {})}
    _, terms = safe_clip_loss(t_safe, t_unsafe, v_safe, v_unsafe, t_ref, v_ref, has_unsafe_image=has_unsafe_image,
                              scale=scale)
    rows = slice(None) if has_unsafe_image is None else has_unsafe_image  # the rows that have V*
    g = F.normalize(gap_dir.float().to(t_ref.device), dim=-1)  # (on the device already, in a run: bind_objective)
    on_g = lambda x: component_along(x, g)
    terms["gap_text"] = soft_hinge(on_g(t_safe.detach()) + offset - on_g(t_unsafe), tau)
    if len(v_unsafe):
        terms["gap_image"] = soft_hinge(on_g(v_unsafe) + offset - on_g(v_safe[rows].detach()), tau)
    terms["gap_hold"] = ((on_g(t_safe) - on_g(t_ref)) ** 2).mean() + ((on_g(v_safe) - on_g(v_ref)) ** 2).mean()
    return weighted_total(terms, lambdas), terms


# What the objectives beyond the paper derive from the frozen targets, once (`frozen_targets`, section 7).

def nearest_safe(queries, pool, chunk=4096):
    """(Q,) index of the pool row with the highest cosine to each query (SafeR-CLIP's t^)."""
    pool = F.normalize(pool.float(), dim=-1)
    return torch.cat([(F.normalize(q.float(), dim=-1) @ pool.t()).argmax(1) for q in queries.split(chunk)])


def curriculum_order(t_safe, t_unsafe):
    """Training rows from easy to hard: by decreasing cosine between the frozen embeddings of a
    pair's safe and unsafe captions (an unsafe caption close to its safe one needs the smallest
    move). INFERRED: SafeR-CLIP says "easy to hard by the safe-unsafe similarity"; the direction
    is our reading of it. Ties keep row order."""
    cos = F.cosine_similarity(t_safe.float(), t_unsafe.float(), dim=-1)
    return cos.argsort(descending=True, stable=True)


def curriculum_rows(order, epoch):
    """Rows of an epoch under the curriculum: the easiest third in epoch 0, two thirds in epoch 1,
    all from epoch 2 on. INFERRED: SafeR-CLIP publishes "easy, then adds medium, then all", not
    the bins; equal thirds are our choice."""
    return order[: math.ceil(len(order) * min(epoch + 1, 3) / 3)]


def unsafe_direction(safe, unsafe):
    """twin-offset's "unsafe" direction u: the unit vector along which the frozen model's unsafe
    embeddings (normalised) have the most second moment *more* than its safe ones, the top
    eigenvector of M(unsafe) - M(safe) with M(x) = mean of x x^T. The safe data hardly use it, and
    the towers can produce it (their unsafe inputs already do; the direction of least safe
    variance cannot serve: the final LayerNorm makes some directions unreachable). Signed so its
    largest entry is positive (eigh's sign is arbitrary)."""
    moment = lambda x: (lambda y: y.t() @ y / len(y))(F.normalize(x.double(), dim=-1))
    u = torch.linalg.eigh(moment(unsafe) - moment(safe)).eigenvectors[:, -1]
    return (u * u[u.abs().argmax()].sign()).float()


def modality_gap(t_ref, v_ref):
    """twin-gap's direction g: normalize(mean of the unit T0(T) - mean of the unit V0(V)), from CLIP's
    images to its captions (float64 means; the training rows)."""
    mean = lambda x: F.normalize(x.double(), dim=-1).mean(0)
    return F.normalize(mean(t_ref) - mean(v_ref), dim=0).float()


@dataclass(frozen=True)
class Objective:
    loss: object  # f(t_safe, t_unsafe, v_safe, v_unsafe, **references, lambdas=..) -> (total, terms)
    lambdas: dict  # the terms and their default weights
    references: tuple = ("t_ref", "v_ref")  # per-row references from the frozen model it takes
    constants: tuple = ()  # references that are one tensor for the whole data
    curriculum: bool = False  # epochs grow from the easiest pairs to all (SafeR-CLIP)
    recipe: dict = None  # its paper's training options, used where the command line gives none


OBJECTIVES = {
    "safeclip": Objective(safe_clip_loss, LAMBDAS),
    "safer-clip": Objective(safer_clip_loss, SAFER_LAMBDAS,
                            ("t_ref", "v_ref", "t_unsafe_ref", "v_unsafe_ref", "t_near", "v_near"), curriculum=True,
                            recipe={"lr": 1e-4, "batch_size": 48}),  # and LoRA r16, our default
    "twin-offset": Objective(twin_offset_loss, TWIN_OFFSET_LAMBDAS, constants=("unsafe_dir",)),
    "twin-margin": Objective(twin_margin_loss, TWIN_MARGIN_LAMBDAS),
    "twin-nce": Objective(twin_nce_loss, TWIN_NCE_LAMBDAS),
    "twin-gap": Objective(twin_gap_loss, TWIN_GAP_LAMBDAS, constants=("gap_dir",)),
}
# The terms, of every objective, computed over the rows that have V* only (validation weighs them so).
TERMS_OVER_UNSAFE_IMAGES = UNSAFE_IMAGE_TERMS + ("rank_text_safe", "rank_text_unsafe", "rank_image_unsafe", "gap_image")


# =============================================================================================
# PART II. THE PLUMBING
# =============================================================================================
# A reader who stops here has seen all of Safe-CLIP: what is computed, in what precision, from
# which targets, and what a checkpoint restores. What follows makes it run on real files, real
# machines and real command lines; it reads, writes, checks, fetches and schedules, and decides
# none of the method's numbers:
#
#   10. Tokenizer             Tokenizer (from_file, train, save, __call__, decode), clean_text
#   11. Image transform       _resize_short_side, _center_crop: torchvision's rounding, in PIL
#   12. Weights               load, save, _read_state_dict (every format, nothing executed),
#                             from_hf_state_dict / to_hf_state_dict, _atomic_write
#   13. Export                export_hf, export_openai
#   14. Downloads             resolve_model, download, download_file (one per machine), verified
#   15. Data files            read_pairs, open_image, encode_texts / encode_images (batching
#                             loops: their callers choose the precision)
#   16. Devices, torchrun     setup_device, gather / gather_rows / gather_some, from_rank0, to_device;
#                             the training loader: training_steps, MicroBatches, rank_shares
#   17. The run               training_rows, initial_model; the frozen targets' cache
#                             (objective_inputs, _fingerprint); Run and its pieces:
#                             RunFolder (lock, train_config.json, log), Checkpoint (the file),
#                             StopSignals, BestModel (validation's use); TensorBoard, WandB; validate
#   18. The command line      build_parser, cmd_train, train_option_errors, main


# ---------------------------------------------------------------------------------------------
# 10. Tokenizer: OpenAI's byte-level BPE, run by the `tokenizers` library
# ---------------------------------------------------------------------------------------------
# OpenAI's clip/simple_tokenizer.py does four things: clean the text (ftfy, HTML entities,
# whitespace, lower case), split it with a regex into words, punctuation runs and single digits,
# map each word's UTF-8 bytes to printable characters, and apply BPE merges to each word with
# "</w>" marking its end. `tokenizers` does the last three in Rust; the cleaning stays in Python.

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # end-of-word suffix: "cat</w>" is the whole word, "cat" the start of a longer one

# Whitespace matches none of the branches, so it never reaches a token; that is why we need not
# collapse it as OpenAI does. OpenAI compiles the pattern case-insensitively; on lower-cased text
# that only lets "'" + "ſ" (long s, which case-folds to s) match 's, hence the explicit [sſ]
# (Oniguruma's (?i) would do the same but halves the speed of the whole tokenizer).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
OPENAI_MERGES = 49152 - 256 - 2  # simple_tokenizer reads lines 1..48894 of the merges file
# What a folder may hold, in the order `Tokenizer.from_file` prefers: Hugging Face's full
# description, its plain merges file (vocab.json beside it), OpenAI's own file.
TOKENIZER_FILES = ("tokenizer.json", "merges.txt", "bpe_simple_vocab_16e6.txt.gz")
TOKENIZER_MAX_BYTES = 64 << 20  # OpenAI's vocabulary is 1.4 MiB, Hugging Face's tokenizer.json 3.5 MiB


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) move to
    U+0100 and up. The order of the result is the order of the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _ftfy_character_fixes() -> dict[int, str | None]:
    """The part of ftfy.fix_text that maps single characters, as one str.translate table.

    OpenAI cleans every text with ftfy, which is not a dependency here. Most of what it changes in
    real captions is a fixed character mapping, reproduced here; its mojibake repair is not
    (KNOWN_DIFFERENCES in tests/test_tokenizer.py lists the inputs that tokenize differently).
    """
    table: dict[int, str | None] = {}
    # Latin ligatures and digraphs, mostly from copy-pasted PDFs ("ŉ" also gets its quote uncurled).
    ligatures = ["IJ", "ij", "'n", "DZ", "Dz", "dz", "DŽ", "Dž", "dž", "LJ", "Lj", "lj", "NJ", "Nj", "nj",
                 "ff", "fi", "fl", "ffi", "ffl", "ſt", "st"]
    table.update(zip(map(ord, "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ"), ligatures))
    # Fullwidth and halfwidth forms ("ＣＬＩＰ", "ｶﾀｶﾅ") and the ideographic space.
    for code in range(0xFF01, 0xFFF0):
        plain = unicodedata.normalize("NFKC", chr(code))
        if plain != chr(code):
            table[code] = plain
    table[0x3000] = " "
    # Curly quotes, so that "it’s" splits like "it's".
    table.update(dict.fromkeys(map(ord, "\u02bc\u2018\u2019\u201a\u201b"), "'"))
    table.update(dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"'))
    # C1 controls become the Windows-1252 characters they almost always were ("\x80" -> "€",
    # "\x93" -> "“" -> '"').
    for code in range(0x80, 0xA0):
        try:
            table[code] = bytes([code]).decode("cp1252").translate(table)
        except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are unassigned in Windows-1252
            pass
    # Control and invisible format characters that are not whitespace are dropped.
    table.update(dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]))
    return table


FTFY_CHARACTER_FIXES = _ftfy_character_fixes()
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """OpenAI's basic_clean + whitespace_clean + lower(), with ftfy's character fixes in place of ftfy."""
    # ftfy unescapes HTML itself, then fixes characters; but from the first line holding a "<" on
    # (it may be markup) it leaves HTML alone. OpenAI's code then unescapes twice. Same order here.
    first_lt = text.find("<")
    markup_from = len(text) if first_lt < 0 else text.rfind("\n", 0, first_lt) + 1
    prose, markup = text[:markup_from], text[markup_from:]
    text = _fix_characters(_unescape_html(prose)) + _unescape_html(_fix_characters(markup))
    return text.lower()


def _unescape_html(text: str) -> str:
    return html.unescape(html.unescape(text)) if "&" in text else text


def _fix_characters(text: str) -> str:
    if text.isascii() and text.isprintable():  # plain ASCII, by far the common case, needs nothing
        return text
    if _SURROGATE.search(text):  # lone halves of UTF-16 pairs, e.g. from broken JSON: pair them or mark them
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return unicodedata.normalize("NFC", text.translate(FTFY_CHARACTER_FIXES))


class Tokenizer:
    """CLIP's tokenizer: `tok(texts) -> LongTensor[N, 77]` of SOT, BPE ids, EOT, zero padding.

    Build one with `Tokenizer.from_file` (OpenAI's merges file or a Hugging Face tokenizer.json)
    or `Tokenizer.train`. The ids of a vocabulary are its own; the conventions are always CLIP's:
    byte-level BPE with the "</w>" suffix, CLIP's split pattern, SOT and EOT with EOT the highest
    id (the text encoder pools at the argmax id).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        bad = next(((t, i) for t, i in vocab.items() if not (isinstance(i, int) and 0 <= i < len(vocab))), None)
        if bad is not None:  # (the ids index tables of the vocabulary's size)
            raise ValueError(f"token {bad[0]!r} has id {bad[1]!r}, outside the vocabulary's 0..{len(vocab) - 1}")
        missing = [t for t in (SOT, EOT) if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary has no {' or '.join(missing)} token")
        if vocab[EOT] != max(vocab.values()):
            raise ValueError(f"{EOT} must have the highest id (CLIP pools at it), but it is {vocab[EOT]} "
                             f"of {max(vocab.values())}")
        for i, (a, b) in enumerate(merges):
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"merge {i} ({a!r} {b!r}) uses a token that is not in the vocabulary")
        self.sot_id, self.eot_id = vocab[SOT], vocab[EOT]
        self.vocab_size = vocab[EOT] + 1
        self._vocab, self._merges = vocab, merges
        self._saved = {}  # context_length -> the files `save` writes (training saves a model often)

        self._tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, end_of_word_suffix=EOW))
        self._tokenizer.pre_tokenizer = _clip_pre_tokenizer()
        # OpenAI maps a literal "<|endoftext|>" in a text to the EOT id; registering both as special
        # tokens does the same (it only differs when the marker directly follows punctuation).
        self._tokenizer.add_special_tokens([SOT, EOT])

        # Each id's bytes for decode(): the "</w>" suffix becomes a space, SOT and EOT nothing.
        self._id_bytes: list[bytes | None] = [None] * self.vocab_size
        for token, i in vocab.items():
            word = token.removesuffix(EOW)
            if token in (SOT, EOT):
                self._id_bytes[i] = b""
            elif all(c in CHAR_TO_BYTE for c in word):
                self._id_bytes[i] = bytes(CHAR_TO_BYTE[c] for c in word) + (b" " if word != token else b"")
            else:
                raise ValueError(f"token {token!r} (id {i}) is not made of byte-level BPE characters")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)})"

    # -- reading, training, saving -------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read OpenAI's bpe_simple_vocab_16e6.txt.gz (or the plain .txt), a Hugging Face CLIP
        tokenizer.json, a merges.txt, or a folder holding any of them. In a folder, tokenizer.json
        comes first, then merges.txt (with vocab.json beside it, if any), then OpenAI's file."""
        path = Path(path)
        vocab_json = None
        if path.is_dir():
            found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no {', '.join(TOKENIZER_FILES)} in this folder")
            if found[0].name == "merges.txt" and (path / "vocab.json").is_file():
                vocab_json = path / "vocab.json"
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file (expected OpenAI's bpe_simple_vocab_16e6.txt.gz, "
                                    f"a tokenizer.json, or a folder holding one)")
        try:
            data = _read_bounded(path, TOKENIZER_MAX_BYTES)
            if data[:2] == b"\x1f\x8b":
                try:
                    with gzip.GzipFile(fileobj=io.BytesIO(data)) as inflated:
                        data = inflated.read(TOKENIZER_MAX_BYTES + 1)  # never more than that in memory
                except (OSError, EOFError) as e:
                    raise ValueError(f"damaged gzip file ({e})") from None
                if len(data) > TOKENIZER_MAX_BYTES:
                    raise ValueError(f"inflates to more than {TOKENIZER_MAX_BYTES >> 20} MiB (OpenAI's vocabulary "
                                     "is 1.4 MiB); not a tokenizer file")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"not a tokenizer file (not UTF-8 text: {e})") from None
            if text.lstrip().startswith("{"):
                return cls._from_tokenizer_json(text)
            merges = cls._read_merges(text)
            return cls(_clip_vocab(merges) if vocab_json is None else _read_vocab_json(vocab_json), merges)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{path}: {e if isinstance(e, ValueError) else f'malformed ({type(e).__name__}: {e})'}") from None

    @staticmethod
    def _read_merges(text: str) -> list[tuple[str, str]]:
        # Line 0 is a version header; then one merge per line. OpenAI's code reads 48,894 of them,
        # and builds the vocabulary as _clip_vocab does, so a merges file alone is a tokenizer.
        lines = text.split("\n")[1:OPENAI_MERGES + 1]
        while lines and not lines[-1].strip():  # a short file's final newline
            lines.pop()
        merges = []
        for number, line in enumerate(lines, start=2):
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"line {number}: expected a merge 'left right', found {line[:80]!r}")
            merges.append(pair)
        if not merges:
            raise ValueError("no BPE merges found (expected OpenAI's bpe_simple_vocab_16e6.txt.gz)")
        return merges

    @classmethod
    def _from_tokenizer_json(cls, text: str) -> "Tokenizer":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply; not a tokenizer.json") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not {"vocab", "merges"} <= model.keys():
            raise ValueError("not a BPE tokenizer.json (expected a 'model' of type 'BPE' with 'vocab' and 'merges')")
        if model.get("end_of_word_suffix") != EOW:
            raise ValueError(f"not a CLIP tokenizer: model.end_of_word_suffix is "
                             f"{model.get('end_of_word_suffix')!r}, expected {EOW!r}")
        vocab = dict(model["vocab"])
        for i, added in enumerate(spec.get("added_tokens") or []):
            if not (isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int)):
                raise ValueError(f"added_tokens[{i}] needs a string 'content' and an integer 'id', found {added!r:.80}")
            vocab.setdefault(added["content"], added["id"])
        return cls(vocab, _merge_pairs(model["merges"]))

    @classmethod
    def train(cls, texts, vocab_size: int = 4096) -> "Tokenizer":
        """Learn a small BPE on `texts` with CLIP's conventions (byte alphabet, "</w>", CLIP's split,
        SOT and EOT as the last two ids), e.g. for a toy CLIP; the vocabulary is smaller than
        `vocab_size` when the texts run out of pairs to merge. Deterministic: of two pairs seen
        equally often, the first in string order merges first. (The `tokenizers` trainer breaks such
        ties by a hash order that changes from process to process, and so did a toy CLIP's ids.)"""
        if vocab_size < 2 * 256 + 2:
            raise ValueError(f"vocab_size must be at least 514 (256 bytes, the same with {EOW}, SOT, EOT), "
                             f"got {vocab_size}")
        split = _clip_pre_tokenizer()
        counts = collections.Counter(w for t in texts for w, _ in split.pre_tokenize_str(clean_text(t)))
        words = [[*w[:-1], w[-1] + EOW] for w in counts]  # each word as its symbols, and how often it occurs
        freq = list(counts.values())
        pairs, where = collections.Counter(), collections.defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pairs[pair] += freq[i]
                where[pair].add(i)
        heap = [(-n, pair) for pair, n in pairs.items()]  # most frequent first, ties in string order
        heapq.heapify(heap)
        known, merges = set(_clip_vocab([])), []
        while heap:
            n, pair = heapq.heappop(heap)
            if -n != pairs[pair] or n == 0:
                continue  # a count that has changed since it was pushed
            if pair[0] + pair[1] not in known:  # (a merge may rebuild a known token: it costs no id)
                if len(known) == vocab_size:  # (known holds SOT and EOT too)
                    break
                known.add(pair[0] + pair[1])
            merges.append(pair)
            changed = set()
            for i in sorted(where.pop(pair)):  # each word that held the pair: merge it there, left to right
                old, new, j = words[i], [], 0
                while j < len(old):
                    if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                        new.append(old[j] + old[j + 1])
                        j += 2
                    else:
                        new.append(old[j])
                        j += 1
                for p in zip(old, old[1:]):
                    pairs[p] -= freq[i]
                    changed.add(p)
                for p in zip(new, new[1:]):
                    pairs[p] += freq[i]
                    where[p].add(i)
                    changed.add(p)
                words[i] = new
            for p in changed - {pair}:
                heapq.heappush(heap, (-pairs[p], p))
        return cls(_clip_vocab(merges), merges)

    def save(self, folder: str | os.PathLike, context_length: int = 77) -> Path:
        """Write the Hugging Face tokenizer files of OpenAI's CLIP folders into `folder`, each
        atomically, and return the path of tokenizer.json:

        tokenizer.json                the whole tokenizer (what `Tokenizer.from_file` reads first)
        vocab.json, merges.txt        the same BPE as plain files, for readers that want those
        tokenizer_config.json         model_max_length = `context_length` (the model's), CLIP's
        special_tokens_map.json       special tokens: SOT begins, EOT ends, pads and stands in
                                      for unknown words

        Without model_max_length, transformers' CLIPTokenizer reports 10^30 and Stable Diffusion
        pads every prompt to that length. Note that transformers pads with EOT where we pad with
        0; the causal mask makes the outputs up to EOT the same either way."""
        if context_length not in self._saved:
            self._saved[context_length] = self._hf_files(context_length)
        folder = Path(folder)
        for name, text in self._saved[context_length].items():
            _atomic_write(folder / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return folder / "tokenizer.json"

    def _hf_files(self, context_length: int) -> dict[str, str]:
        """File name -> text, for `save`."""
        hf = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
        # For other readers only: from_file takes just the vocabulary and merges from this file.
        hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
                                              normalizers.Lowercase()])
        hf.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                          special_tokens=[(SOT, self.sot_id), (EOT, self.eot_id)])
        # Decoding: "</w>" -> the byte-level space "Ġ" -> bytes -> text, minus the trailing space.
        hf.decoder = decoders.Sequence([decoders.Replace(EOW, BYTE_TO_CHAR[ord(" ")]), decoders.ByteLevel(),
                                        decoders.Strip(" ", 0, 1)])
        special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, **special,
                  "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        return {"tokenizer.json": hf.to_str(pretty=True), "vocab.json": json.dumps(self._vocab, ensure_ascii=False),
                "merges.txt": merges, "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
                "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}

    # -- use -------------------------------------------------------------------------------------

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.LongTensor:
        """Tokenize: [N, context_length] ids, SOT + tokens + EOT + zeros. A text that does not fit
        is cut and ends with EOT, like clip.tokenize(..., truncate=True)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        try:
            cleaned = [clean_text(t) for t in texts]
        except (AttributeError, TypeError):
            bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
            raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str") from None
        ids = [e.ids for e in self._tokenizer.encode_batch_fast(cleaned, add_special_tokens=False)]

        # Pack without a Python loop over tokens: a row keeps its first `kept` ids, then EOT.
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        kept = np.minimum(lengths, context_length - 2)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # index within its row
        out = np.zeros((len(ids), context_length), dtype=np.int64)
        out[:, 0] = self.sot_id
        out[:, 1:-1][np.arange(context_length - 2) < kept[:, None]] = flat[position < np.repeat(kept, lengths)]
        out[np.arange(len(ids)), kept + 1] = self.eot_id
        return torch.from_numpy(out)

    def decode(self, ids) -> str | list[str]:
        """Ids back to text: SOT dropped, the row cut at the first EOT (the rest is padding), each
        word followed by a space (so "cat," comes back as "cat ,"). A 2-D input gives a list."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        pieces = [self._id_bytes[i] if isinstance(i, int) and 0 <= i < self.vocab_size else None for i in ids]
        if None in pieces:
            bad = ids[pieces.index(None)]
            raise ValueError(f"token id {bad!r} is not in this vocabulary (ids 0..{self.vocab_size - 1})")
        data = b"".join(pieces)
        return data.decode("utf-8", errors="replace").rstrip(" ")


def _read_bounded(path, limit):
    """The bytes of `path`, refusing a file larger than `limit` before reading it."""
    size = Path(path).stat().st_size
    if size > limit:
        raise ValueError(f"{size >> 20} MiB, more than any tokenizer file ({limit >> 20} MiB at most)")
    return Path(path).read_bytes()


def _clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # CLIP's split into words, then each word's UTF-8 bytes as byte-level characters.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizer.json stores a merge as "left right" (older files) or as ["left", "right"].
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _read_vocab_json(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(_read_bounded(path, TOKENIZER_MAX_BYTES).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path.name} beside it is not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path.name} beside it is not a {{token: id}} object")
    return vocab


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: 256 byte characters, the same with "</w>", one per merge, SOT, EOT."""
    tokens = [*BYTE_TO_CHAR.values(), *(c + EOW for c in BYTE_TO_CHAR.values()), *(a + b for a, b in merges), SOT, EOT]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}  # a merge may rebuild a known token


# ---------------------------------------------------------------------------------------------
# 11. The image transform's details: torchvision's exact rounding, in PIL
# ---------------------------------------------------------------------------------------------


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    # torchvision.transforms.Resize(size): the short side becomes `size`, the long one is truncated.
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if w <= h else (new_long, new_short)
    return image if new_size == (w, h) else image.resize(new_size, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    # torchvision.transforms.CenterCrop(size): the offset is round((side - size) / 2), Python's round
    # (halves to even); a side shorter than `size` is padded with zeros, the odd pixel after it.
    # PIL fills the part of a crop box outside the image with zeros, which is that padding.
    def offset(side: int) -> int:
        return -((size - side) // 2) if side < size else int(round((side - size) / 2.0))

    left, top = offset(image.size[0]), offset(image.size[1])
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# 12. Reading and saving weights
# ---------------------------------------------------------------------------------------------
# Four kinds of file hold CLIP weights: OpenAI's releases (TorchScript archives), plain state
# dicts in OpenAI/OpenCLIP naming, Hugging Face `CLIPModel` folders, and this project's folders.
# All of them become one OpenAI-named state dict, from which `build_model` (section 3) makes the
# model.


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Reads the pickle of a PyTorch zip archive, rebuilding tensors and nothing else.

    OpenAI's `.pt` files are TorchScript archives: their `data.pkl` describes module objects of
    classes like `__torch__.clip.model.CLIP`. We never import or run anything named there: any
    such class becomes a plain record of its attributes, and only the tensor-rebuilding function
    and storage types are honoured. Everything else is refused.
    """

    STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32,
                      "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
                      "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
                      "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}

    class Record(dict):
        """Stands in for a TorchScript module: keeps its attributes, runs nothing."""

        def __setstate__(self, state):
            if isinstance(state, dict):
                self.update(state)

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in self.STORAGE_DTYPES:
            return self.STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        if module.startswith("__torch__"):
            return self.Record
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors are read")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            size = self.archive.getinfo(name).file_size
            if size != numel * dtype.itemsize:  # checked before a byte is read
                raise pickle.UnpicklingError(f"storage {key} is {size} bytes, expected {numel} x {dtype.itemsize}")
            raw = bytearray(self.archive.read(name))
            storage = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if storage.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key} holds {storage.numel()} values, expected {numel}")
            self.storages[key] = storage
        return self.storages[key]


def _rebuild_tensor(storage, offset, size, stride, *_):
    _check_extent(size, stride, offset, storage.numel())
    return torch.as_strided(storage, size, stride, offset).clone()


def _check_extent(size, stride, offset, available):
    """Refuse a tensor that needs more values than its storage holds (a 1 KB file whose stride-0
    "view" claims 6000 x 6000 values), before anything is allocated for it."""
    n = math.prod(size)
    last = offset + sum((s - 1) * abs(st) for s, st in zip(size, stride)) if n else 0
    if n > available or last >= max(available, 1) and n:
        raise CheckpointError(f"a tensor of shape {tuple(size)} needs {n} values, but its storage holds {available}")


def _read_torch_archive(path):
    """All tensors of a PyTorch zip archive (TorchScript or not), by dotted name, without pickle."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError(f"{path}: no data.pkl in this zip archive; not a PyTorch file")
        prefix = pickles[0][: -len("data.pkl")]
        root = _TensorOnlyUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()

    tensors = {}

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                # TorchScript keeps parameters and submodules as attributes; skip its bookkeeping.
                if isinstance(key, str) and key not in ("training", "_is_full_backward_hook"):
                    walk(value, f"{name}.{key}" if name else key)

    walk(root, "")
    return tensors


def _read_state_dict(path):
    """A state dict from a single weights file, never executing code from it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format PyTorch file or safetensors file (legacy "
                              "pickle files are not read, since unpickling can run code)")
    with zipfile.ZipFile(path) as archive:
        torchscript = any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
        for info in archive.infolist():  # sizes from the zip's directory, before a byte is inflated
            if "/data/" in info.filename and info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: tensor data {info.filename} is compressed, which PyTorch never "
                                      "writes; refused (it could inflate to any size)")
            if info.filename.endswith(".pkl") and info.file_size > PICKLE_MAX_BYTES:
                raise CheckpointError(f"{path}: {info.filename} would inflate to {info.file_size >> 20} MiB; a "
                                      "CLIP's is well under 1 MiB")
    if torchscript:
        sd = _read_torch_archive(path)
        for key in ("input_resolution", "context_length", "vocab_size"):  # not weights
            sd.pop(key, None)
        return sd
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle ({e})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, expected a state dict")
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):  # a view may claim more than its storage has
            try:
                _check_extent(value.shape, value.stride(), value.storage_offset(),
                              value.untyped_storage().nbytes() // value.element_size())
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {key!r}: {e}") from None
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# Hugging Face names -> OpenAI names, per tower and per block. q/k/v and the transposed
# projections are handled in code.
HF_TOWERS = {"text_model.": "", "vision_model.": "visual."}
HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
HF_PROJECTIONS = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}


def from_hf_state_dict(hf):
    """A Hugging Face CLIPModel state dict in OpenAI naming."""
    sd, qkv = {}, {}
    for key, value in hf.items():
        if key.endswith("position_ids"):  # a buffer older transformers versions saved
            continue
        if key in HF_TOP:
            sd[HF_TOP[key]] = value
        elif key in HF_PROJECTIONS:
            sd[HF_PROJECTIONS[key]] = value.t().contiguous()  # HF stores (E, C), OpenAI (C, E)
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.")
            i, sub = rest.split(".", 1)
            block = f"{HF_TOWERS[tower + '.']}transformer.resblocks.{i}."
            module, param = sub.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(block + f"attn.in_proj_{param}", {})[module[-6]] = value
            elif module in HF_BLOCK:
                sd[block + f"{HF_BLOCK[module]}.{param}"] = value
            else:
                raise CheckpointError(f"unexpected Hugging Face key {key!r}")
        else:
            raise CheckpointError(f"unexpected Hugging Face key {key!r}")
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"attention weights incomplete for {name!r}: have {sorted(parts)}")
        sd[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return sd


def to_hf_state_dict(sd):
    """The inverse of `from_hf_state_dict`: OpenAI naming -> Hugging Face CLIPModel naming."""
    top = {v: k for k, v in HF_TOP.items()}
    projections = {v: k for k, v in HF_PROJECTIONS.items()}
    block_names = {v: k for k, v in HF_BLOCK.items()}
    hf = {}
    for key, value in sd.items():
        if key in top:
            hf[top[key]] = value
        elif key in projections:
            hf[projections[key]] = value.t().contiguous()
        else:
            tower = "vision_model" if key.startswith("visual.") else "text_model"
            i, sub = key.split("transformer.resblocks.")[1].split(".", 1)
            module, param = sub.rsplit(".", 1)
            prefix = f"{tower}.encoder.layers.{i}."
            if module == "attn" and param.startswith("in_proj_"):
                for name, part in zip("qkv", value.chunk(3)):
                    hf[prefix + f"self_attn.{name}_proj.{param[len('in_proj_'):]}"] = part.contiguous()
            else:
                hf[prefix + f"{block_names[module]}.{param}"] = value
    return hf


def _config_from_hf(path, hf_config):
    try:
        text, vision = hf_config["text_config"], hf_config["vision_config"]
        acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
        if len(acts) != 1 or acts.pop() not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"{path}: unsupported activation(s) {acts}; expected quick_gelu or gelu")
        return dict(vision_heads=vision["num_attention_heads"], text_heads=text["num_attention_heads"],
                    quick_gelu=text.get("hidden_act", "quick_gelu") == "quick_gelu")
    except KeyError as e:
        raise CheckpointError(f"{path}: key {e} missing from a Hugging Face CLIP config") from None


def load(path, device="cpu", tokenizer=None, quick_gelu=None):
    """Load CLIP weights from any file a user is likely to have, or an OpenAI model by name.

    Returns `(model, preprocess)`: the model in eval mode, float32, on `device`, with
    `model.tokenizer` attached where one can be found; `preprocess` turns a PIL image into the
    model's input tensor. `path` is an OpenAI name ("ViT-L/14": its verified file in the weights
    folder, downloaded there when missing, see `resolve_model`), an OpenAI `.pt` file, a plain
    state dict (`.pt`, `.pth`, `.bin`, `.safetensors`), a Hugging Face CLIPModel folder, or a
    folder written by `save`. `tokenizer` (a path or a Tokenizer) overrides the one found;
    `quick_gelu` overrides the activation, which a plain state dict does not record: without
    `export_openai`'s sidecar JSON beside it, it is guessed from the width (OpenCLIP's LAION
    models then need False).
    """
    path = resolve_model(path)
    found_tokenizer, reading = None, path  # `reading`: the file being read, for the error messages
    try:
        if path.is_dir():
            config_file = reading = path / "config.json"
            if not config_file.exists():
                raise CheckpointError(f"{path}: a folder without config.json; expected a Hugging Face "
                                      "CLIPModel folder or a folder written by safeclip.save")
            meta = json.loads(config_file.read_text())
            if any((path / name).is_file() for name in TOKENIZER_FILES):
                found_tokenizer = path
            if "safeclip" in meta:
                reading = path / "model.safetensors"
                sd = load_safetensors(str(reading))
                config = _recorded_config(config_file, meta, sd)
            else:
                weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
                if not weights:
                    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
                reading = weights[0]
                sd = from_hf_state_dict(_read_state_dict(reading))
                config = CLIPConfig(**{**asdict(infer_config(sd)), **_config_from_hf(config_file, meta)})
        else:
            sd = _read_state_dict(path)
            sidecar = path.with_suffix(".json")  # written by `export_openai`
            meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            config = _recorded_config(sidecar, meta, sd) if "safeclip" in meta else infer_config(sd)
        if quick_gelu is not None:
            config = replace(config, quick_gelu=quick_gelu)
        model = build_model(sd, config, path)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except (zipfile.BadZipFile, SafetensorError, EOFError, RuntimeError, OSError, ValueError, IndexError,
            KeyError, TypeError, pickle.UnpicklingError, RecursionError) as e:
        raise CheckpointError(f"{reading}: cannot read this file ({type(e).__name__}: {e}); it may be "
                              "truncated or corrupt") from None

    if tokenizer is not None:
        model.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    elif found_tokenizer is not None:
        model.tokenizer = Tokenizer.from_file(found_tokenizer)
    else:
        model.tokenizer = _default_tokenizer(path, config)
    return model.to(device).eval(), image_transform(config.image_resolution)


def _recorded_config(config_file, meta, sd):
    """The config `save` or `export_openai` wrote, checked against the tensors it describes.
    Head counts and the activation leave no trace in the shapes; that is why they are written."""
    config = CLIPConfig(**meta["safeclip"]["config"])
    shapes = {**asdict(infer_config(sd)), "vision_heads": config.vision_heads,
              "text_heads": config.text_heads, "quick_gelu": config.quick_gelu}
    if CLIPConfig(**shapes) != config:
        raise CheckpointError(f"{config_file}: config does not match the tensors' shapes")
    return config


def _default_tokenizer(weights_path, config):
    """OpenAI's vocabulary where `default_vocabulary` finds it. Models with another vocabulary
    size get none (and an error on first use)."""
    found = default_vocabulary(weights_path) if config.vocab_size == 49408 else None
    return Tokenizer.from_file(found) if found is not None else None


def default_vocabulary(weights_path):
    """The file of OpenAI's vocabulary that `load` attaches to weights without a tokenizer of
    their own: beside the weights, then in ./weights, then in the weights folder; or None."""
    for folder in (Path(weights_path).parent, Path.cwd() / "weights", weights_folder()):
        if (folder / VOCAB_FILE).exists():
            return folder / VOCAB_FILE
    return None


class MissingTokenizer(CheckpointError, RuntimeError):
    """A model loaded without any tokenizer (a RuntimeError too, as it always was)."""


def require_tokenizer(model):
    if model.tokenizer is None:
        raise MissingTokenizer(
            f"no tokenizer for this model: put OpenAI's {VOCAB_FILE} in weights/ "
            "(`python safeclip.py download ViT-B/32` fetches it) or pass a tokenizer "
            "(--tokenizer PATH: a tokenizer.json, the .txt.gz vocabulary, or a folder holding either)")
    return model.tokenizer


def _atomic_write(path, write):
    """Write a file through a temporary name in the same folder and rename it into place, so a
    crash never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _torch_save(obj, path):
    """torch.save, with a failed write (a full disk) reported as the OSError that says why: torch's
    zip writer turns some of them into "enforce fail ... unexpected pos"."""
    errors = []

    class File(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            try:
                return f.write(data)
            except OSError as e:
                errors.append(e)
                raise

    with open(path, "wb") as f:
        try:
            torch.save(obj, File())
        except RuntimeError:
            if errors:
                raise errors[0] from None
            raise


def _write_json(path, obj):
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save(model, folder, tokenizer=None):
    """Write `folder/model.safetensors`, the tokenizer's files (see `Tokenizer.save`) and
    `folder/config.json`, each atomically; config.json goes last, so a folder with one is
    complete. LoRA is merged."""
    folder = Path(folder)
    tokenizer = tokenizer or model.tokenizer
    sd = _plain_state_dict(model)
    _atomic_write(folder / "model.safetensors", lambda tmp: save_safetensors(sd, tmp))
    if tokenizer is not None:
        tokenizer.save(folder, model.config.context_length)
    _write_json(folder / "config.json", {"safeclip": {"config": asdict(model.config)}})


# ---------------------------------------------------------------------------------------------
# 13. Export: Hugging Face folders and OpenAI state dicts
# ---------------------------------------------------------------------------------------------


def export_hf(model, folder):
    """A Hugging Face CLIPModel folder laid out like openai/clip-vit-large-patch14's:
    `transformers.CLIPModel.from_pretrained(folder)` loads it, `CLIPProcessor.from_pretrained`
    finds the tokenizer and image preprocessing, its text tower serves as Stable Diffusion's
    `text_encoder` (with its `tokenizer`), its vision tower as LLaVA's."""
    c, folder = model.config, Path(folder)
    act = "quick_gelu" if c.quick_gelu else "gelu"
    eot = model.tokenizer.eot_id if model.tokenizer is not None else c.vocab_size - 1
    config = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
        "logit_scale_init_value": float(model.logit_scale.detach()), "initializer_factor": 1.0,
        "text_config": {"model_type": "clip_text_model", "hidden_size": c.text_width,
                        "intermediate_size": 4 * c.text_width, "num_attention_heads": c.text_heads,
                        "num_hidden_layers": c.text_layers, "max_position_embeddings": c.context_length,
                        "vocab_size": c.vocab_size, "hidden_act": act, "projection_dim": c.embed_dim,
                        "bos_token_id": eot - 1, "eos_token_id": eot, "pad_token_id": eot, "layer_norm_eps": 1e-5},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": c.vision_width,
                          "intermediate_size": 4 * c.vision_width, "num_attention_heads": c.vision_heads,
                          "num_hidden_layers": c.vision_layers, "image_size": c.image_resolution,
                          "patch_size": c.vision_patch_size, "hidden_act": act, "projection_dim": c.embed_dim,
                          "num_channels": 3, "layer_norm_eps": 1e-5},
    }
    sd = to_hf_state_dict(_plain_state_dict(model))
    _atomic_write(folder / "model.safetensors", lambda tmp: save_safetensors(sd, tmp, metadata={"format": "pt"}))
    if model.tokenizer is not None:
        model.tokenizer.save(folder, c.context_length)
    # CLIPImageProcessor's version of image_transform: the same steps, up to a pixel (sections 5 and 10).
    R = c.image_resolution
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": R}, "resample": 3,  # PIL's bicubic
        "do_center_crop": True, "crop_size": {"height": R, "width": R},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True})
    _write_json(folder / "config.json", config)


def export_openai(model, path):
    """An OpenAI-named state dict, as OpenAI's `clip.model.build_model` expects, and beside it
    `path` with the suffix .json: the head counts and activation, which the tensors do not show
    (`load` reads it; without it a model with exact GELU would come back as QuickGELU)."""
    path = Path(path)
    sd = _plain_state_dict(model)
    _atomic_write(path, lambda tmp: _torch_save(sd, tmp))
    _write_json(path.with_suffix(".json"), {"safeclip": {"config": asdict(model.config)}})


# ---------------------------------------------------------------------------------------------
# 14. Downloads: OpenAI's weights and vocabulary, resumed when cut, verified before they appear
# ---------------------------------------------------------------------------------------------

# OpenAI stores each file under a folder named for its SHA-256: every URL carries its own checksum.
OPENAI_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# The BPE vocabulary lives in OpenAI's CLIP repository, not beside the weights: its hash is ours.
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_URL = f"https://raw.githubusercontent.com/openai/CLIP/main/clip/{VOCAB_FILE}"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
DOWNLOAD_TIMEOUT = 30  # seconds to wait for a connection or the next bytes before giving up


class DownloadError(RuntimeError):
    """A file could not be fetched or failed its checksum; the message says which and what to do."""


def weights_folder():
    """Where OpenAI's models live when named: $SAFECLIP_WEIGHTS, else weights/ beside this file."""
    return Path(os.environ.get("SAFECLIP_WEIGHTS") or HERE / "weights")


def resolve_model(model, flag=None):
    """The path of `model`: an existing file or folder as it is; an OpenAI name ("ViT-L/14", or
    the file's name, "ViT-L-14") as its file in `weights_folder()`, verified against its SHA-256
    as clip.load does, and downloaded there first when missing or wrong. `flag` (e.g. "--model")
    names the option the value came from, for the error messages."""
    path = Path(model)
    if path.exists():
        return path
    try:
        url = _model_url(str(model))
    except ValueError:
        raise FileNotFoundError(f"{model}: no such file or folder, nor a model name "
                                f"({', '.join(model_table())})") from None
    sha256, filename = url.split("/")[-2:]
    folder = weights_folder()
    path = folder / filename
    if (folder / VOCAB_FILE).is_file() and verified(path, sha256):
        return path
    try:
        return download(model, folder)
    except DownloadError as e:
        instead = f"give the path of weights you have ({flag} PATH)" if flag else "load weights you have by their path"
        raise DownloadError(f"{model} is not in {folder} and could not be downloaded: {e} Two ways out: run "
                            f"`python safeclip.py download {model}` on a machine with network access and copy "
                            f"its weights/ folder to {folder}, or {instead}.") from None


def download(name, folder=None, base_url=None, progress=True):
    """Fetch OpenAI's CLIP `name` and the BPE vocabulary into `folder` (default: the weights
    folder, see `weights_folder`); return the weights' Path.

    `name` is a key of `model_table()` ("ViT-B/32") or its file name ("ViT-B-32", "ViT-B-32.pt").
    `base_url` (default: the SAFECLIP_BASE_URL environment variable) is a mirror laid out like
    OpenAI's `.../clip/models/`: `{base_url}/{sha256}/ViT-B-32.pt`, and the vocabulary at
    `{base_url}/bpe_simple_vocab_16e6.txt.gz`. `progress=False` silences bars and messages.
    """
    url = _model_url(name)
    sha256, filename = url.split("/")[-2:]
    vocab_url = VOCAB_URL
    base_url = base_url or os.environ.get("SAFECLIP_BASE_URL")
    if base_url:
        base_url = base_url.rstrip("/")
        url, vocab_url = f"{base_url}/{sha256}/{filename}", f"{base_url}/{VOCAB_FILE}"
    folder = Path(folder) if folder is not None else weights_folder()
    weights = download_file(url, folder / filename, sha256, progress)
    download_file(vocab_url, folder / VOCAB_FILE, VOCAB_SHA256, progress)
    return weights


def model_table():
    """The models known by name: OpenAI's, and those of the JSON file that $SAFECLIP_MODELS names,
    if set: {"name": "https://.../<sha256>/<file>.pt"}, each URL with its file's SHA-256 as its
    folder, as OpenAI's are. It adds names (your own models, served by a mirror) or replaces
    OpenAI's URLs (a mirror of re-packed files, with their own hashes). Read at each look-up."""
    table, path = dict(OPENAI_MODELS), os.environ.get("SAFECLIP_MODELS")
    if not path:
        return table
    try:
        extra = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DownloadError(f"{path} (SAFECLIP_MODELS): cannot read it ({e})") from None
    if not isinstance(extra, dict):
        raise DownloadError(f"{path} (SAFECLIP_MODELS): expected a JSON object {{name: URL}}")
    for name, url in extra.items():
        if not (isinstance(url, str) and url.startswith(("https://", "http://"))
                and re.fullmatch(r"[0-9a-f]{64}", url.split("/")[-2]) and url.endswith(".pt")):
            raise DownloadError(f"{path} (SAFECLIP_MODELS): {name!r}: expected a URL ending in /<sha256>/<file>.pt, "
                                f"got {url!r}")
    return {**table, **extra}


def _model_url(name):
    for known, url in model_table().items():
        filename = url.rsplit("/", 1)[1]
        if name.lower() in (known.lower(), filename.lower(), filename.removesuffix(".pt").lower()):
            return url
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(model_table())} "
                     "(or its file name, such as ViT-B-32)")


def download_file(url, path, sha256, progress=True):
    """Fetch `url` to `path` unless a file with this SHA-256 is already there; return `path`.

    Bytes go to `path.part` first, which a later call resumes. Only a file whose SHA-256 matches is
    renamed to `path`, so `path` is never partial or wrong (a wrong one found there is replaced).
    One process at a time fetches a given file: the others (the ranks of a torchrun job, another
    job on the same weights folder) wait for it, then find the file there and verified.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise DownloadError(f"{path} exists but is not a file: move it away and run again")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent, f"another process is fetching into {path.parent}: waiting for it", progress):
        if verified(path, sha256):
            _say(progress, f"{path} is already present and verified: nothing to download")
            return path
        if path.is_file():
            _say(progress, f"{path} does not have SHA-256 {sha256}: downloading it again")
        part = path.with_name(path.name + ".part")
        _fetch(url, part, progress)
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()  # resuming from wrong bytes can never give the right file
            raise DownloadError(f"{url} gave a file with SHA-256 {actual}, expected {sha256}; it was "
                                "deleted. Run again; if this repeats, the server or mirror holds a "
                                "different file.")
        os.replace(part, path)
        _stamp(path, sha256)
    return path


def verified(path, sha256):
    """Whether `path` is a file with this SHA-256. The hash is computed once (890 MB for ViT-L/14,
    seconds) and remembered in a stamp beside the file, `.NAME.sha256`, valid while the file keeps
    its size and modification time: the ranks of a job, and later runs, then check the stamp alone."""
    path = Path(path)
    if not path.is_file():
        return False
    stamp, stat = path.with_name(f".{path.name}.sha256"), path.stat()
    try:
        if stamp.read_text().split() == [sha256, str(stat.st_size), str(stat.st_mtime_ns)]:
            return True
    except OSError:
        pass
    if sha256_file(path) != sha256:
        return False
    _stamp(path, sha256)
    return True


def _stamp(path, sha256):
    stat = path.stat()
    try:  # a read-only weights folder only costs a hash per run
        _atomic_write(path.with_name(f".{path.name}.sha256"),
                      lambda tmp: Path(tmp).write_text(f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"))
    except OSError:
        pass


@contextlib.contextmanager
def _folder_lock(folder, waiting, progress=True):
    """An exclusive flock on the folder itself while the block runs, waiting (and saying so) while
    another process holds it. It leaves no file behind, and the OS drops it when its holder dies,
    so no stale lock can remain."""
    import fcntl
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fetch(url, part, progress):
    """Append what `part` lacks of `url`'s body to `part`, asking the server to skip what it has."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:  # no bytes past `offset`: the hash tells if `part` is whole
            return
        raise DownloadError(
            f"{url} answered HTTP {err.code} {err.reason}. Check the model name and, for a mirror "
            "(--base-url or SAFECLIP_BASE_URL), that it holds BASE/<sha256>/<file>.pt and "
            f"BASE/{VOCAB_FILE}; or put the file at {part.with_suffix('')} yourself.") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"cannot reach {url}: {getattr(err, 'reason', err)}. Check the URL and the network, or "
            "point --base-url (or SAFECLIP_BASE_URL) at a mirror.") from err

    with response:
        resumed = response.status == 206
        if offset and not resumed:
            _say(progress, f"{url} ignored the request to resume: starting {part.name} again")
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        error = None
        with open(part, "ab" if resumed else "wb") as file, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.with_suffix("").name, disable=not progress) as bar:
            try:
                while chunk := response.read1(1 << 20):  # whatever has arrived, up to 1 MiB
                    file.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # cut or stalled
                error = err
            received = file.tell()
    # read1() returns b"" rather than raising when a connection closes early: count the bytes.
    if error is not None or (total is not None and received != total):
        raise DownloadError(
            f"download of {url} stopped after {received} of {total or 'unknown'} bytes "
            f"({error or 'connection closed'}); {part} keeps them: run the same command again to "
            "resume.")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(progress, message):
    if progress:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# 15. Data files: pairs.jsonl, images, and embedding many of them
# ---------------------------------------------------------------------------------------------
# {"safe": .., "unsafe": .., "safe_image": .., "unsafe_image": .., "category": .., "split": ..}
# Image paths are relative to the .jsonl file's folder. ViSU's names `nsfw` and `nsfw_image` are
# accepted for `unsafe` and `unsafe_image`. `unsafe_image` is optional (None when absent): the
# public datasets publish no unsafe images.


class DataError(ValueError):
    """Bad training or evaluation data; the message names the file, the line and the problem."""


ALIASES = {"nsfw": "unsafe", "nsfw_image": "unsafe_image"}
SPLITS = ("train", "val", "test")


def _parse_row(line, folder):
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for alias, name in ALIASES.items():
        if alias in row and name not in row:
            row[name] = row[alias]
    for key in ("safe", "unsafe", "safe_image", "unsafe_image"):
        if key == "unsafe_image" and row.get(key) is None:
            continue  # optional: ViSU-Text and NSFWCaps publish no unsafe images
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"missing or empty field {key!r}")
    split = row.get("split") or "train"
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    images = {k: str(folder / row[k]) if row.get(k) else None for k in ("safe_image", "unsafe_image")}  # absolute stays absolute
    for key, image in images.items():
        if image is not None and not os.path.isfile(image):
            raise ValueError(f"{key} {image} does not exist")
    category = row.get("category")
    return dict(safe=row["safe"], unsafe=row["unsafe"], **images,
                category=None if category is None else str(category), split=split)


def read_pairs(path, split=None, skip_bad=False):
    """The quadruplets of a pairs.jsonl file (of one `split`, if given), checked before use.

    A malformed line stops with a DataError naming the file and line, unless `skip_bad`, which
    skips it and counts it in `read_pairs.skipped`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _parse_row(line, path.parent)
            except (ValueError, TypeError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
                if not skip_bad:
                    raise DataError(f"{path}:{number}: {e}") from None
                skipped += 1
                continue
            row["line"] = number
            if split is None or row["split"] == split:
                rows.append(row)
    read_pairs.skipped = skipped
    return rows


def open_image(path):
    """A PIL image, fully decoded now so a broken file fails here with its name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


class ImageFolder(torch.utils.data.Dataset):
    """Images by path, preprocessed; the index comes along so batches can find their references."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(open_image(self.paths[i]))


def encode_texts(model, texts, batch_size=256, device=None, desc=None, precision=None):
    """Embeddings (N, E) of `texts`, batched, float32 on the CPU, not normalised."""
    ids = require_tokenizer(model)(list(texts), context_length=model.config.context_length)
    return encode_token_ids(model, ids, batch_size, device, desc, precision)


def encode_token_ids(model, ids, batch_size=256, device=None, desc=None, precision=None):
    """Embeddings (N, E) of already tokenized texts (N, L); `desc=False` hides the progress bar;
    `precision` as for `autocast` (default: bf16 on CUDA, float32 on the CPU)."""
    device = device or model.logit_scale.device
    out = []
    with torch.inference_mode(), autocast(device, precision):
        for i in tqdm(range(0, len(ids), batch_size), desc=desc or "text", disable=desc is False, leave=False):
            out.append(model.encode_text(trim_padding(ids[i:i + batch_size], 1).to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


def encode_images(model, preprocess, paths, batch_size=64, device=None, desc=None, workers=0, precision=None):
    """Embeddings (N, E) of the images at `paths`, batched, float32 on the CPU, not normalised.
    An unreadable image raises a DataError naming it. `precision` as for `encode_token_ids`."""
    device = device or model.logit_scale.device
    # A generator of its own: a DataLoader otherwise draws a seed from the global RNG, and an
    # evaluation would then change the dropout masks of the training steps after it.
    loader = torch.utils.data.DataLoader(ImageFolder(list(paths), preprocess), batch_size=batch_size,
                                         num_workers=workers, generator=torch.Generator(),
                                         pin_memory=torch.device(device).type == "cuda")
    out = []
    with torch.inference_mode():
        for pixels in tqdm(loader, desc=desc or "images", disable=desc is False, leave=False):
            with autocast(device, precision):
                out.append(model.encode_image(pixels.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


def _check_images(rows, data, skip_bad, verbose):
    """Open every image header once before training, so a broken file stops the run up front."""
    good, bad = [], 0
    for row in tqdm(rows, desc="checking images", disable=not verbose, leave=False):
        try:
            for key in ("safe_image", "unsafe_image") if row["unsafe_image"] else ("safe_image",):
                with Image.open(row[key]) as image:
                    image.verify()
            good.append(row)
        except Exception as e:  # PIL raises many types for broken files
            if not skip_bad:
                raise DataError(f"{data}:{row['line']}: unreadable {key} {row[key]} ({e})") from None
            bad += 1
    return good, bad


def _report_terms(terms, n):
    """Say which Safe-CLIP terms this run trains and over how many rows."""
    full = [k for k, rows in terms.items() if rows == n]
    partial = {k: rows for k, rows in terms.items() if rows != n}
    lines = [f"Safe-CLIP terms over all {n} training rows: {', '.join(full)}"]
    lines += [f"  {k} over the {rows} rows with an unsafe image" for k, rows in partial.items()]
    missing = [k for k in LAMBDAS if k not in terms]
    if missing:
        lines.append(f"  skipped, no row has an unsafe image: {', '.join(missing)} "
                     "(weights renormalised over the other terms)")
    print("\n".join(lines), file=sys.stderr)


def image_cache_mib(rows, resolution):
    """The memory that the preprocessed float32 images of `rows` take."""
    images = sum(1 + (r["unsafe_image"] is not None) for r in rows)
    return images * 3 * resolution ** 2 * 4 / 2 ** 20


# ---------------------------------------------------------------------------------------------
# 16. Devices and distributed set-up (torchrun): no-ops in a single process
# ---------------------------------------------------------------------------------------------


def dist_info():
    """(rank, world size, local rank) from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_device(requested, local_rank):
    """The training device: `requested` (--device), where a bare "cuda" means this process's GPU,
    cuda:LOCAL_RANK (torch.cuda.set_device refuses a device without an index); by default CUDA
    when there is one, else the CPU."""
    if requested is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def setup_device(config):
    """The training device, with the process group (under torchrun) and the device's settings."""
    device = resolve_device(config.device, dist_info()[2])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {config.device}: this torch {torch.__version__} sees no CUDA device")
    if "WORLD_SIZE" in os.environ:  # torchrun, even with one process: the multi-GPU code path
        # The backend is bound to the training device ("cuda:nccl" takes only CUDA tensors, as NCCL
        # does; "cpu:gloo" only CPU ones): every collective here runs on that device's tensors.
        torch.distributed.init_process_group(f"{device.type}:{'nccl' if device.type == 'cuda' else 'gloo'}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 (float32's range, 10 mantissa bits) speeds up float32 matmuls; only where a low
        # precision was asked for: --precision fp32 stays true float32, and so do the frozen
        # references whatever the precision (see `true_fp32`).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.precision != "fp32"
    if config.compile and device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise TrainingError("--compile on the CPU needs a C++ compiler for torch.compile's generated kernels: "
                            "install g++ (Debian/Ubuntu: apt-get install g++) or set CXX to one, or drop --compile")
    return device


def end_process_group():
    """Tear torchrun's process group down, on every rank together, at the end of a run that every
    rank finished (rank 0 decides when to stop, so the barrier cannot hang). DistributedDataParallel
    keeps the group alive in reference cycles that only the garbage collector frees; left for the
    interpreter's exit, the group's threads are torn down after Python's and the rank aborts
    ("terminate called without an active exception"): 1 two-process run in 5 to 30 on a loaded
    2-core CPU, none in 80 with this."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def from_rank0(obj):
    """Rank 0's `obj`, on every rank. A decision that depends on what one process sees (its files,
    a cache, a checkpoint, its validation result) is taken by rank 0 alone: a rank that decided
    otherwise would skip or add a collective that the others run, and NCCL would hang."""
    if not distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag, device):
    """True on every rank when `flag` is true on any (one small all-reduce, only under torchrun)."""
    if not distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sends each rank the gradient of its own rows, summed over ranks."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad.chunk(torch.distributed.get_world_size())[torch.distributed.get_rank()]


def gather_some(x, present, present_all):
    """`gather` for a tensor that holds only the rows of a batch where `present` (B,) is true:
    all-gather needs one shape on every rank, so the rows travel padded to the whole batch.
    `present_all` is `present` of every rank, gathered (both host data: no sync)."""
    if not distributed():
        return x
    padded = x.new_zeros(len(present), *x.shape[1:]).index_copy(0, to_device(present.nonzero()[:, 0], x.device), x)
    gathered = gather(padded)
    return gathered if present_all.all() else gathered.index_select(0, to_device(present_all.nonzero()[:, 0], x.device))


def to_device(x, device):
    """A host tensor on `device` without waiting for it: a copy from pinned memory is queued on the
    GPU's stream, where one from ordinary memory would first wait for the stream to drain."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def gather_rows(local, n, rank, world, device):
    """Rows computed rank-strided (rank r holds rows r, r + world, ...) -> all n rows, in order, on
    the CPU. The all-gather itself runs on `device`, the one the process group is bound to (NCCL
    takes only CUDA tensors)."""
    if world == 1 or n == 0:
        return local
    size = -(-n // world)
    padded = torch.zeros(size, *local.shape[1:], dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n].cpu()  # interleave back to row order


def _quiet_worker(_):
    """A data-loading worker leaves SIGTERM and Ctrl-C to the training process, which stops at the
    end of its step (see `Run`); a worker that died of them would fail the step instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -- the training loader: this rank's share of every micro-batch ------------------------------
# Under torchrun each rank loads and embeds only its share of a micro-batch's rows, but every rank
# knows the whole micro-batch (from the seed and the step: `Schedule`), so every shape of a step,
# the V* that exist on other ranks included, is decided from host data: nothing waits for the GPU
# or asks the other ranks.

def rank_shares(rows, world):
    """A micro-batch's rows over `world` ranks, [rank 0's, rank 1's, ...]: rank r takes every
    world-th row from r on (one process: all of them). `gather` concatenates the ranks'
    embeddings in this order."""
    return [rows[r::world] for r in range(world)]


def micro_batch(collated, rows, world, has_v_unsafe):
    """The MicroBatch of a micro-batch's `rows` (a row of `Schedule.batches`): `collated` is
    `collate_quadruplets`' four for this rank's share of them (`rank_shares`), `has_v_unsafe` (N,)
    says which training rows have V*."""
    every_rank = torch.cat(rank_shares(rows, world))
    return MicroBatch(*collated, every_rank, has_v_unsafe[every_rank])


class MicroBatches:
    """This rank's rows of every micro-batch from step `start` to `total`, epoch after epoch: the
    batch sampler of the run's one DataLoader, whose workers then live for the whole run (a loader
    per epoch would start fresh workers, and stall, at every epoch's start)."""

    def __init__(self, schedule, start, total):
        self.schedule, self.start, self.total = schedule, start, total
        self.rank, self.world = dist_info()[:2]

    def __len__(self):
        return (self.total - self.start) * self.schedule.accum

    def __iter__(self):
        for rows in self.global_batches():
            yield rank_shares(rows, self.world)[self.rank].tolist()

    def global_batches(self):
        """Each micro-batch's rows, all ranks' together (`Schedule.batches`, from step `start` on)."""
        step, accum = self.start, self.schedule.accum
        while step < self.total:
            epoch, done = self.schedule.locate(step)
            batches = self.schedule.batches(epoch)[done * accum: (done + self.total - step) * accum]
            yield from batches
            step += len(batches) // accum


@contextlib.contextmanager
def training_steps(dataset, schedule, start, total, workers, generator, device):
    """The steps from `start` to `total`, each a list of --accum `MicroBatch`es, loaded by
    `workers` processes, whose seeds come from `generator` (`train`'s own). The workers stop when
    the block is left, however it is left: an error whose traceback keeps this frame alive would
    otherwise keep them too, and the interpreter's exit would wait on them for ever (they ignore
    SIGTERM, see `_quiet_worker`)."""
    sampler = MicroBatches(schedule, start, total)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_quadruplets,
        pin_memory=torch.device(device).type == "cuda", worker_init_fn=_quiet_worker,
        generator=generator)
    has_v_unsafe = torch.tensor([r["unsafe_image"] is not None for r in dataset.rows])
    batches = iter(loader)
    whole = (micro_batch(b, rows, sampler.world, has_v_unsafe) for b, rows in zip(batches, sampler.global_batches()))
    try:
        yield iter(lambda: list(itertools.islice(whole, schedule.accum)), [])
    finally:
        if hasattr(batches, "_shutdown_workers"):  # (a loader with workers)
            batches._shutdown_workers()


# ---------------------------------------------------------------------------------------------
# 17. The run: set-up, the frozen targets' cache, bookkeeping, validation
# ---------------------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a resume that does not fit, a full disk)."""


class Stopped(Exception):
    """Training stopped on a signal after writing its checkpoint; `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


RUN_FILES = ("train_config.json", "checkpoint.pt", "config.json")  # a folder with one holds a run or a model
# What a resume may not change: each of these makes a different run, neither the old one nor a new
# one. Anything else (--epochs, --steps, --patience, --save-every, --workers, the device, ...)
# only extends or re-paces it, and a change is logged.
RUN_SETTINGS = ("data_sha256", "model", "tokenizer", "scratch", "vocab_size", "quick_gelu", "objective", "lambdas",
                "offset", "margin", "margin_tau", "nce_scale", "seed", "batch_size", "accum", "lr", "schedule", "warmup", "weight_decay",
                "grad_clip", "full", "lora_rank", "lora_alpha", "lora_dropout", "freeze", "precision")


def training_rows(config, world, verbose):
    """The train and val rows of --data, every image checked before the first step, and how many
    bad rows --skip-bad dropped: (train rows, val rows, skipped)."""
    rows = read_pairs(config.data, skip_bad=config.skip_bad)
    rows, bad = _check_images([r for r in rows if r["split"] in ("train", "val")], config.data, config.skip_bad, verbose)
    skipped = read_pairs.skipped + bad
    train_rows = [r for r in rows if r["split"] == "train"]
    # Counted after the rows --skip-bad dropped: what is left must still make one step.
    left = f"{len(train_rows)} training rows" + (f" (after skipping {skipped} bad row(s))" if skipped else "")
    if len(train_rows) < config.batch_size:
        raise DataError(f"{config.data}: {left}, fewer than one batch of {config.batch_size}")
    if len(train_rows) < config.batch_size * config.accum:
        raise DataError(f"{config.data}: {left}, fewer than one step of "
                        f"{config.batch_size} x {config.accum} (--batch-size x --accum)")
    if config.batch_size % world:
        raise TrainingError(f"--batch-size {config.batch_size} must divide evenly over {world} processes")
    return train_rows, [r for r in rows if r["split"] == "val"], skipped


def initial_model(config, train_rows):
    """The model to train, on the CPU: pre-trained weights (by name, downloaded if need be), or,
    with --scratch, a fresh one with a BPE trained on the captions (unless --tokenizer).
    Returns (model, preprocess, the weights' path or None)."""
    if config.scratch is None:
        model_path = resolve_model(config.model, "--model")
        model, preprocess = load(model_path, device="cpu", tokenizer=config.tokenizer, quick_gelu=config.quick_gelu)
        require_tokenizer(model)
        return model, preprocess, model_path
    if config.tokenizer:
        tokenizer = Tokenizer.from_file(config.tokenizer)
    else:
        tokenizer = Tokenizer.train([r[k] for r in train_rows for k in ("safe", "unsafe")], vocab_size=config.vocab_size)
    model = CLIP(scratch_config(config.scratch, tokenizer.vocab_size, config.quick_gelu))
    model.tokenizer = tokenizer
    return model, image_transform(model.config.image_resolution), None


def _fingerprint(model_path, rows, model, objective="safeclip", n_train=None):
    """What the cached references depend on: the weight files, the model's sizes and activation,
    the tokenizer's content (not just its size), this code, the data and, for objectives that need
    more than T0(T) and V0(V), the objective and where the training split ends."""
    h = hashlib.sha256()
    paths = sorted(Path(model_path).rglob("*")) if Path(model_path).is_dir() else [Path(model_path)]
    for p in paths:
        if p.is_file():
            h.update(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    h.update(json.dumps(asdict(model.config)).encode())
    h.update(model.tokenizer._tokenizer.to_str().encode())
    h.update(Path(__file__).read_bytes())
    spec, needs = OBJECTIVES[objective], set(references_needed(objective))  # the frozen embeddings used
    if spec.references != Objective.references or spec.constants or spec.curriculum:
        h.update(f"{objective} {n_train}".encode())
    for r in rows:
        st = os.stat(r["safe_image"])
        h.update(f"{r['safe']}\0{r['safe_image']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if "t_unsafe_ref" in needs:
            h.update(f"{r['unsafe']}\n".encode())
        if "v_unsafe_ref" in needs and r["unsafe_image"] is not None:
            st = os.stat(r["unsafe_image"])
            h.update(f"{r['unsafe_image']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def objective_inputs(compute, cache, fingerprint, write=lambda path, write: write(path)):
    """`compute()` (the run's `frozen_targets`) computed once per weights, data and code: read from
    `cache` (a safetensors file) when it was written under `fingerprint` (`_fingerprint`), else
    computed and written there. Rank 0 alone decides whether the cache holds them, and sends them
    to the other ranks; they compute them together."""
    stored = None
    if dist_info()[0] == 0 and cache.exists():
        from safetensors import safe_open
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                stored = {k: f.get_tensor(k) for k in f.keys()}
    stored = from_rank0(stored)
    if stored is None:
        stored = compute()
        if dist_info()[0] == 0:
            write(cache, lambda path: _atomic_write(
                path, lambda tmp: save_safetensors(stored, tmp, metadata={"fingerprint": fingerprint})))
    return stored


class RunFolder:
    """The --out folder of a run: it refuses a folder that holds another run (unless --resume, which
    must not change the run's settings), locks it for the process's whole life, records
    train_config.json, appends log.jsonl (and, with --report-to, TensorBoard's or W&B's curves), and writes
    every file whole, or stops with one line that names the file and what is intact. Only rank 0
    writes; rank 0 decides the refusal for every rank."""

    def __init__(self, config, main_process):
        self.config, self.main, self.out = config, main_process, Path(config.out)
        self.log_path = self.out / "log.jsonl"
        self.lock, self.extended, self.report, self.checkpoint = None, {}, None, None
        if main_process and getattr(config, "report_to", None):
            REPORTERS[config.report_to].client()  # a missing package stops the run before anything is written
        refusal = from_rank0(self._refusal() if main_process else None)
        if refusal:
            raise TrainingError(refusal)
        if self.main and self.out.is_dir():
            self._lock()

    def _refusal(self):
        """Why this command may not run in --out, or None."""
        marker = next((self.out / name for name in RUN_FILES if (self.out / name).exists()), None)
        if marker is not None and not self.config.resume:
            return (f"{self.out} already holds a run ({marker.name}); nothing was changed. Add --resume to "
                    "continue it (with the same settings), or choose another --out")
        recorded = self.out / "train_config.json"
        if not (self.config.resume and recorded.is_file()):
            return None
        try:
            old = json.loads(recorded.read_text())
        except (OSError, ValueError) as e:
            return f"{recorded}: cannot be read ({e}); nothing was changed. Restore it, or start afresh in another --out"
        new = self.settings()
        changed = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in RUN_SETTINGS if k in old and old[k] != new[k]]
        if changed:
            return (f"--resume with other settings than the run in {self.out}: " + "; ".join(changed)
                    + ". Nothing was changed. Give the run's own settings (see its train_config.json), or "
                    "start a new run in another --out")
        self.extended = {k: [old[k], new[k]] for k in new if k in old and k not in RUN_SETTINGS and old[k] != new[k]
                         and k not in ("resume",)}
        return None

    def settings(self):
        """The settings train_config.json records, as JSON values: every option, the data and the
        base model as absolute paths (so evaluate.py --ckpt OUT finds them from anywhere), and the
        data file's SHA-256 (a resume must train on the same rows)."""
        config = self.config
        portable = {k: str(Path(v).resolve()) for k, v in (("data", config.data), ("model", config.model))
                    if v is not None and Path(v).exists()}
        settings = {**{f.name: getattr(config, f.name) for f in fields(TrainConfig)}, **portable}
        if Path(config.data).is_file():
            settings["data_sha256"] = sha256_file(config.data)
        return json.loads(json.dumps(settings))

    def _lock(self):
        """An exclusive lock on --out for this process's life: the OS drops it when the process
        ends, however it ends, so a crash never leaves a stale lock. The lock file stays empty."""
        import fcntl
        self.lock = open(self.out / ".lock", "a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self.out / ".lock")
            self.lock.close()
            raise TrainingError(f"{self.out} is in use by another training run ({holder}); nothing was changed. "
                                "Wait for it to end, or choose another --out") from None

    def open(self):
        """Create the folder and lock it (rank 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.lock is None:
            self._lock()

    def start_log(self, header):
        """A new run: an empty log (with `header`, if any, as its first record) and its settings."""
        self.write(self.log_path, lambda path: path.write_text(""))
        self.write(self.out / "train_config.json", lambda path: _write_json(path, self.settings()))
        if header:
            self.log(header)

    def start_report(self, first_step):
        if getattr(self.config, "report_to", None):
            self.report = REPORTERS[self.config.report_to](self.out, first_step, self.settings())

    def log(self, record):
        self.write(self.log_path, lambda path: _append_log(path, record))
        if self.report is not None:
            self.report.add(record)

    def write(self, path, write):
        """`write(path)`; if it fails (a full disk, a file-size limit, an I/O error), stop with one
        line that names the file and says what is intact. Every write is whole or not at all."""
        try:
            write(Path(path))
        except TrainingError:
            raise
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports I/O errors as RuntimeError
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
            kept = self.checkpoint.intact() if self.checkpoint is not None else "no checkpoint was written yet"
            raise TrainingError(f"cannot write {path}: {reason}; {kept}. Free some space, then run the same command "
                                "with --resume") from None

    def close(self):
        if self.report is not None:
            self.report.close()
        if self.lock is not None:
            self.lock.close()  # releases the lock


class Checkpoint:
    """OUT/checkpoint.pt: `training_state` written whole, and read back by --resume (rank 0 reads it
    and sends it to every rank), a damaged one named with what is intact and the ways out."""

    def __init__(self, folder):
        self.folder, self.path, self.saved_step = folder, folder.out / "checkpoint.pt", None
        folder.checkpoint = self

    def intact(self):
        return (f"the checkpoint {self.path} (step {self.saved_step}) is intact" if self.saved_step
                else "no checkpoint was written yet")

    def save(self, trainable, optimizer, scaler, progress):
        ckpt = training_state(trainable, optimizer, scaler, progress)  # every rank: it gathers their generators
        if not self.folder.main:
            return
        self.folder.write(self.path, lambda path: _atomic_write(path, lambda tmp: _torch_save(ckpt, tmp)))
        self.saved_step = progress["step"]

    def load(self, trainable):
        """The checkpoint, on every rank; refuses one that cannot be read or does not fit this run."""
        ckpt = None
        if self.folder.main:
            try:
                ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
                if not {"trainable", "optimizer", "state", "rng"} <= set(ckpt):
                    ckpt = ValueError("not a checkpoint of safeclip.py train (keys missing)")
            except Exception as e:  # torch raises many types for a cut or damaged file
                ckpt = e
        ckpt = from_rank0(ckpt)
        out = self.folder.out
        if isinstance(ckpt, Exception):
            intact = [name for name in ("best", "log.jsonl", "train_config.json") if (out / name).exists()]
            raise TrainingError(
                f"{self.path}: cannot be read ({type(ckpt).__name__}: {str(ckpt).splitlines()[0][:200]}); "
                f"nothing in {out} was changed. Intact: {', '.join(intact) or 'nothing else'}. Ways out: "
                "restore checkpoint.pt from a copy and run again with --resume, or start afresh in another --out")
        if set(ckpt["trainable"]) != set(trainable):
            raise TrainingError(f"{self.path}: its trainable parameters do not match this run's options")
        self.saved_step = ckpt["state"]["step"]
        return ckpt


class StopSignals:
    """SIGTERM (how SLURM and Kubernetes preempt) and Ctrl-C: noted, so that the loop finishes its
    step, writes the checkpoint and exits (see `Run.after_step`); a second one stops at once."""

    def __init__(self, say):
        self.signal, self.say, self.old_handlers = None, say, {}

    def catch(self):
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self.signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self.signal = signum
            if self.say:
                tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, once the checkpoint is written "
                           "(again to stop at once)", file=sys.stderr)

        for signum in (signal.SIGTERM, signal.SIGINT):
            self.old_handlers[signum] = signal.signal(signum, handler)

    def restore(self):
        for signum, handler in self.old_handlers.items():
            signal.signal(signum, handler)


class BestModel:
    """Validation's use: each result (rank 0's, for every rank) logged, the best model kept in
    OUT/best, and --patience's early stop. Its progress (best score, step, validations without
    improvement) lives in the run's `state`, which the checkpoint holds."""

    def __init__(self, folder, state, select, patience, validation):
        self.folder, self.state, self.select, self.patience, self.validation = folder, state, select, patience, validation

    def validate(self, model):
        """Validate; True when --patience says stop."""
        metrics = from_rank0(self.validation())
        if metrics is None:  # no val split
            return False
        step = self.state["step"]
        score = -metrics["loss"] if self.select == "loss" else metrics["recall_sum"]
        improved = self.state["best"] is None or score > self.state["best"]
        if improved:
            self.state.update(best=score, best_step=step, bad_evals=0, best_metrics=metrics)
            if self.folder.main:
                self.folder.write(self.folder.out / "best", lambda path: save(model, path))
        else:
            self.state["bad_evals"] += 1
        if self.folder.main:
            self.folder.log({"step": step, "val": metrics, "best_step": self.state["best_step"]})
            tqdm.write(f"step {step}: val loss {metrics['loss']:.4f}, recall-sum {metrics['recall_sum']:.1f}"
                       + (" (best)" if improved else ""))
        return bool(self.patience) and self.state["bad_evals"] >= self.patience

    def final(self, model):
        """The run's model: the best by validation, or `model` (the last) without a val split."""
        best_dir = self.folder.out / "best"
        if self.state["best_step"] is None or not (best_dir / "config.json").exists():
            return model
        try:
            return load(best_dir, device="cpu")[0]
        except CheckpointError as e:
            checkpoint = self.folder.checkpoint
            raise TrainingError(f"{e}. The checkpoint {checkpoint.path} (step {checkpoint.saved_step}) and the log are "
                                f"intact. Ways out: restore {best_dir} and run the same command with --resume, "
                                "or remove it to keep the last model instead") from None


class Run:
    """A training run, used as `with Run(config, ...) as run:`: `train` tells it of each step
    (`after_step`), and it logs the steps (reading the device once per --log-every), validates,
    checkpoints and stops when due. Its pieces: the folder (`RunFolder`), the checkpoint file
    (`Checkpoint`), the signals (`StopSignals`) and the best model (`BestModel`)."""

    def __init__(self, config, main_process):
        self.config, self.main = config, main_process
        self.state = dict(step=0, best=None, best_step=None, bad_evals=0)
        self.stopped, self.started, self.skipped_in_a_row, self.pending = False, time.time(), 0, []
        self.log_every = getattr(config, "log_every", None) or 1
        self.folder = RunFolder(config, main_process)
        self.checkpoint, self.signals = Checkpoint(self.folder), StopSignals(say=main_process)
        self.out, self.log_path, self.ckpt_path = self.folder.out, self.folder.log_path, self.checkpoint.path
        self.write, self.log = self.folder.write, self.folder.log  # (the reference cache writes through it too)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, error, traceback):
        if getattr(self, "bar", None) is not None:
            self.bar.close()  # before any error message
        self.signals.restore()
        self.folder.close()
        if error is not None and not isinstance(error, (*USER_ERRORS, Stopped, KeyboardInterrupt)):
            error.add_note(self._what_now(error))  # printed under the traceback

    def _what_now(self, error):
        """What a failure that keeps its traceback (out of memory, NCCL, the compiler) left, and, for
        out of memory, the ways out."""
        config, saved = self.config, self.checkpoint.saved_step
        kept = (f"The checkpoint {self.ckpt_path} (step {saved}) is intact: once fixed, the same command "
                "with --resume goes on from there." if saved else "No checkpoint was written yet.")
        if not isinstance(error, torch.OutOfMemoryError):
            return f"error: at step {self.step + 1}. {kept}"
        world = dist_info()[1]
        return (f"error: out of memory at step {self.step + 1} with --batch-size {config.batch_size} "
                f"({config.batch_size // world} rows per process, --accum {config.accum}). Ways out: "
                f"--grad-checkpointing (activations of one block at a time, ~1/3 more compute); "
                f"--batch-size {max(1, config.batch_size // 2)} --accum {2 * config.accum} (the same batch in two "
                "halves); or a smaller --batch-size. docs/training.md tables what fits each GPU. " + kept)

    @property
    def step(self):
        return self.state["step"]

    @property
    def signal(self):
        return self.signals.signal

    def _catch_signals(self):
        self.signals.catch()

    def saved_state(self, trainable):
        """With --resume and a checkpoint in the folder: what it holds (`training_state`'s result),
        read, checked against `trainable` and on every rank; else None (a fresh run). Opens (and
        locks) the folder first, so `begin`, which comes next, finds it open."""
        if self.main:
            self.folder.open()
        if self.config.resume and from_rank0(self.ckpt_path.exists()):
            return self.checkpoint.load(trainable)
        return None

    def begin(self, model, trainable, optimizer, scaler, schedule, total_steps, train_rows, loss_fn, validation,
              device, resumed_at=None):
        """Go on from `resumed_at`, the progress `restore_training_state` gave back (with --resume),
        or start the log and record the settings."""
        self.model, self.trainable, self.optimizer, self.scaler = model, trainable, optimizer, scaler
        self.schedule, self.total_steps, self.device = schedule, total_steps, device
        if resumed_at is not None:
            self.state.update(resumed_at)
        self.best = BestModel(self.folder, self.state, self.config.select, self.config.patience, validation)
        safeclip_terms = self.config.objective == "safeclip"
        if resumed_at is not None:
            self.resumed()
        elif self.main:
            self.folder.start_log({"step": 0, "terms": active_terms(train_rows), "nce_scale": loss_fn.keywords["scale"]}
                                  if safeclip_terms else None)
        if self.main:
            self.folder.start_report(first_step=self.step + 1)
        if self.main and safeclip_terms:
            _report_terms(active_terms(train_rows), len(train_rows))
        self.bar = tqdm(total=total_steps, initial=self.step, desc=f"train ({self.config.objective})",
                        disable=not self.main, dynamic_ncols=True)
        self.samples, self.tick = 0, time.time()
        self.signals.catch()

    def resumed(self):
        """The log cut back to the checkpoint's step, and what the resume changed, said."""
        if self.main:
            self.write(self.log_path, lambda path: _truncate_log(path, self.step))
            if self.folder.extended:
                self.log({"step": self.step, "resumed_with": self.folder.extended})
            print(f"resumed from {self.ckpt_path} at step {self.step}"
                  + "".join(f"; {k}: {a} -> {b}" for k, (a, b) in self.folder.extended.items()), file=sys.stderr)

    def after_step(self, epoch, lr, loss, terms, scale):
        """Log the step; validate and checkpoint when due. True when training should stop here."""
        self.state["step"] += 1
        config, step = self.config, self.step
        self.samples += config.batch_size * config.accum
        amp = {}
        if self.scaler.is_enabled():  # fp16: a step whose gradients overflowed was skipped and halved the scale
            amp = dict(loss_scale=scale, skipped=self.scaler.get_scale() < scale)
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if amp["skipped"] else 0
            if self.skipped_in_a_row == 20:  # no scale makes these finite
                raise TrainingError(
                    f"fp16: 20 steps in a row with non-finite gradients or loss, up to step {step} "
                    f"(loss scale now {self.scaler.get_scale():.3g}); try --precision bf16 or fp32, or a lower --lr.")
        self.pending.append((step, epoch, lr, loss.detach(), {k: v.detach() for k, v in terms.items()}, amp,
                             self.samples / (time.time() - self.tick)))
        self.bar.update()
        epoch_end = self.schedule.locate(step)[1] == 0
        if len(self.pending) >= self.log_every:
            self.flush()
        if (step % config.eval_every == 0 if config.eval_every else epoch_end) or step == self.total_steps:
            self.stopped = self.validate_and_select()
        # Under torchrun, agreeing on a signal is a collective that waits for the GPU: every rank
        # asks at the same steps, those where it reads the device anyway (a flush, an epoch's end).
        due = not distributed() or step % self.log_every == 0 or epoch_end or step >= self.total_steps
        signalled = due and any_rank(self.signal is not None, self.device)
        if (config.save_every and step % config.save_every == 0) or epoch_end or self.stopped or signalled:
            self.save_checkpoint()
        if signalled:
            self.flush()
            name = signal.Signals(self.signal or signal.SIGTERM).name
            raise Stopped(f"stopped by {name} at step {step}; the checkpoint {self.ckpt_path} holds it: run the same "
                          "command with --resume to continue exactly where it stopped",
                          128 + (self.signal or signal.SIGTERM))
        return self.stopped or step >= self.total_steps

    def flush(self):
        """Read the loss terms of the steps since the last flush back from the device in one
        transfer (a host-device sync per --log-every steps, not per step and term), stop on a
        non-finite loss, and write their log records."""
        if not self.pending:
            return
        flat = torch.cat([torch.stack([loss, *terms.values()]).float() for _, _, _, loss, terms, _, _ in self.pending])
        values = iter(flat.tolist())
        saved = self.checkpoint.saved_step
        for step, epoch, lr, _, terms, amp, speed in self.pending:
            record = dict(zip(["loss", *terms], values))
            if not math.isfinite(record["loss"]) and not self.scaler.is_enabled():  # fp16: the scaler skips those
                raise TrainingError(
                    f"non-finite loss ({record['loss']}) at step {step - 1}; terms: "  # (steps done before it)
                    + ", ".join(f"{n}={v:.4g}" for n, v in record.items() if n != "loss")
                    + f". The last good checkpoint is {self.ckpt_path if saved else 'not written yet'}"
                    + (f" (step {saved})" if saved else "")
                    + "; try a lower --lr, --precision fp32 or --grad-clip.")
            if self.main:
                self.log({"step": step, "epoch": epoch, "lr": lr, **record, "samples_per_s": round(speed, 2),
                          "precision": self.config.precision, **amp})
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{speed:.1f}")
        self.pending = []
        if self.folder.report is not None:
            self.folder.report.flush()

    def validate_and_select(self):
        """Validate (see `BestModel`); True when --patience says stop. Every rank takes rank 0's
        result, so they all stop at the same step."""
        self.flush()
        return self.best.validate(self.model)

    def save_checkpoint(self):
        """Everything an exact resume needs (`training_state`), in OUT/checkpoint.pt."""
        self.flush()  # a non-finite loss stops the run before it reaches a checkpoint
        self.checkpoint.save(self.trainable, self.optimizer, self.scaler, self.state)

    def finish(self, model, skipped):
        """The last checkpoint, then the run's model: the best by validation, or the last one
        without a val split, saved in the --out folder itself."""
        self.save_checkpoint()
        self.bar.close()
        if not self.main:
            return
        final = self.best.final(model)
        self.write(self.out, lambda path: save(final, path, tokenizer=model.tokenizer))
        best = self.state.get("best_metrics")
        print(f"done: {self.step} steps in {(time.time() - self.started) / 60:.1f} min"
              + (f"; best at step {self.state['best_step']}: val loss {best['loss']:.4f}, recall-sum "
                 f"{best['recall_sum']:.1f}" if best else "")
              + (f"; skipped {skipped} bad row(s)" if skipped else "")
              + f"\nmodel: {self.out} (safeclip.load('{self.out}')), log: {self.log_path}, resume state: "
              f"{self.ckpt_path}", file=sys.stderr)


class TensorBoard:
    """--report-to tensorboard: every number of the log's records (each loss term, lr, samples/s,
    the AMP scale, each validation metric) as a TensorBoard scalar in OUT/tensorboard, written by
    rank 0 and flushed with the log. A resumed run starts at `first_step` and tells TensorBoard to
    drop what a killed run wrote past its checkpoint, so the curves go on with no step twice."""

    def __init__(self, out, first_step, settings=None):
        folder = Path(out) / "tensorboard"
        # TensorBoard reads a folder's event files in name order, and a name starts with the second
        # its file was opened: a resumed run opens its own in a later second than every file before
        # it, so that its purge comes after what it purges (a run killed early may be that young).
        opened = [int(p.name.split(".")[3]) for p in Path(folder).glob("events.out.tfevents.*")
                  if p.name.split(".")[3].isdigit()]
        while opened and time.time() < max(opened) + 1:
            time.sleep(0.05)
        self.writer = self.client()(str(folder), purge_step=first_step if first_step > 1 else None)

    @staticmethod
    def client():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                                "(requirements-extras.txt)") from None
        return SummaryWriter

    def add(self, record):
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def _scalars(record):
    """A log record's curves: {"train/NAME" or "val/NAME": value}, or {} for a record that holds the
    run's settings or its resumptions."""
    if "loss" in record:
        section, values = "train", record
    elif "val" in record:
        section, values = "val", record["val"]
    else:
        return {}
    return {f"{section}/{name}": value for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("step", "epoch")}


class WandB:
    """--report-to wandb: the same curves as TensorBoard's, in one W&B run per --out folder, sent by
    rank 0 with the log, against the training step (the "step" metric: W&B's own counts calls).
    W&B's own settings apply (WANDB_PROJECT, default "safeclip"; WANDB_MODE=offline writes the run
    to disk, and `wandb sync OUT/wandb/*/wandb/offline-run-*` uploads it later). The run's id is kept
    in OUT/wandb/run_id, so a resumed run continues the same W&B run; each process writes its part in
    a folder of its own (OUT/wandb/1, 2, ...).
    W&B cannot take back what a killed run sent past its checkpoint. The steps a resumed run trains
    again come out the same (exact resume), so it sends only the steps after the last one sent, which
    OUT/wandb/last_step records *before* each batch is sent: no step is ever sent twice; a kill in the
    instant between the two leaves that batch's few points out."""

    def __init__(self, out, first_step, settings):
        wandb = self.client()
        folder = Path(out) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file, self.sent_file = folder / "run_id", folder / "last_step"
        run_id = id_file.read_text().strip() if id_file.is_file() else os.urandom(4).hex()
        _atomic_write(id_file, lambda path: Path(path).write_text(run_id))
        self.sent = int(self.sent_file.read_text()) if first_step > 1 and self.sent_file.is_file() else 0
        self.resumed_after, self.pending = self.sent, []
        part = folder / str(1 + sum(p.is_dir() and p.name.isdigit() for p in folder.iterdir()))
        part.mkdir()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "safeclip"), id=run_id, resume="allow",
                              dir=str(part), name=Path(out).resolve().name, config=settings)
        for section in ("train", "val"):
            self.run.define_metric(f"{section}/*", step_metric="step")

    @staticmethod
    def client():
        try:
            import wandb
        except ImportError:
            raise TrainingError("--report-to wandb needs the wandb package: pip install wandb "
                                "(requirements-extras.txt)") from None
        return wandb

    def add(self, record):
        values = _scalars(record)
        if values and record["step"] > self.resumed_after:
            self.pending.append({"step": record["step"], **values})

    def flush(self):
        if not self.pending:
            return
        last = max(self.sent, *(row["step"] for row in self.pending))
        if last > self.sent:
            _atomic_write(self.sent_file, lambda path: Path(path).write_text(str(last)))
        for row in self.pending:
            self.run.log(row)
        self.sent, self.pending = last, []

    def close(self):
        self.flush()
        self.run.finish()


REPORTERS = {"tensorboard": TensorBoard, "wandb": WandB}


def _lock_holder(path):
    """'process PID' of the process that holds the flock on `path`, from Linux's /proc/locks."""
    try:
        inode = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return f"process {fields[4]}"
    except OSError:
        pass
    return "another process"


def _append_log(path, record):
    """Append one JSON line, whole or not at all: a write that fails half-way (a full disk) is
    cut back, so the log never holds a partial line."""
    data = memoryview((json.dumps(record) + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _truncate_log(path, step):
    """After a resume, drop the log lines of steps the checkpoint does not contain."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    _atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


def recall_at_1(queries, gallery):
    """Share of queries whose own row of `gallery` is the nearest (both L2-normalised)."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).t()
    return (sims.argmax(dim=1) == torch.arange(len(queries))).float().mean().item() * 100


@torch.no_grad()
def validate(model, rows, ids, preprocess, refs, loss_fn, config, device):
    """Validation loss (the mean over rows of the per-batch losses) and the public code's
    recall-sum: R@1 both ways for (T, V), (T, V*) and (T*, V)."""
    was_training = model.training
    model.eval()
    n = len(rows)
    p = config.precision  # the training step's precision (default bf16 on CUDA, fp32 on the CPU)
    rank, world, _ = dist_info()  # each rank embeds a stride of the rows; all see them all after
    texts = lambda t: gather_rows(encode_token_ids(model, t[rank::world], config.batch_size, device, desc=False,
                                                   precision=p), len(t), rank, world, device)
    images = lambda paths: gather_rows(encode_images(model, preprocess, paths[rank::world], config.batch_size, device,
                                                     desc=False, workers=config.workers or 0, precision=p),
                                       len(paths), rank, world, device)
    t_safe, t_unsafe = texts(ids[0]), texts(ids[1])
    v_safe = images([r["safe_image"] for r in rows])
    has = torch.tensor([r["unsafe_image"] is not None for r in rows])
    v_unsafe = images([r["unsafe_image"] for r in rows if r["unsafe_image"]])
    model.train(was_training)
    # Every row counts, the last partial batch too, each batch weighted by its size: best-model
    # selection and early stopping must not ignore up to batch - 1 rows. A term on V* counts the
    # batch's rows that have V*, out of all such rows.
    before = [0, *has.long().cumsum(0).tolist()]  # how many rows before row i have V*
    sums = {}
    for i in range(0, n, config.batch_size):
        s = slice(i, i + config.batch_size)
        vu = v_unsafe[before[i]:before[min(i + config.batch_size, n)]]
        weight = len(t_safe[s]) / n
        if loss_fn is not None:
            total, terms = loss_fn(t_safe[s], t_unsafe[s], v_safe[s], vu, has_unsafe_image=has[s],
                                   **{k: v[s] for k, v in refs.items()})
        else:
            total = clip_loss(torch.cat([t_safe[s], t_unsafe[s][has[s]]]), torch.cat([v_safe[s], vu]),
                              model.logit_scale.cpu())
            terms = {}
        for k, v in {"loss": total, **terms}.items():
            share = len(vu) / len(v_unsafe) if k in TERMS_OVER_UNSAFE_IMAGES else weight
            sums[k] = sums.get(k, 0.0) + share * float(v)
    metrics = dict(sums)
    pairs = {"T-V": (t_safe, v_safe), "T-V*": (t_safe[has], v_unsafe), "T*-V": (t_unsafe, v_safe)}
    if not has.any():
        del pairs["T-V*"]
    metrics["recall_sum"] = sum(recall_at_1(a, b) + recall_at_1(b, a) for a, b in pairs.values())
    return metrics


# ---------------------------------------------------------------------------------------------
# 18. The command line
# ---------------------------------------------------------------------------------------------


def parse_lambdas(text, names=LAMBDAS):
    """'0.1,0.1,0.1,0.2,0.25,0.25,0.25,0.5' (in the order of `names`, an objective's terms) or
    'name=value,...'."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            out = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
            unknown = set(out) - set(names)
            if unknown:
                raise ValueError(f"unknown term(s) {sorted(unknown)}; the terms are {', '.join(names)}")
            return out
        if len(parts) != len(names):
            raise ValueError(f"expected {len(names)} weights ({', '.join(names)}), got {len(parts)}")
        return dict(zip(names, map(float, parts)))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--lambdas: {e}") from None


def parse_scratch(text):
    """--scratch 'width=128,layers=4,...' -> the sizes of a model trained from scratch, checked
    while parsing the command line, so a bad one stops before any work."""
    spec = dict(embed_dim=128, image_resolution=32, vision_patch_size=4, width=128, layers=4, context_length=32)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in spec:
            raise argparse.ArgumentTypeError(f"unknown key {key!r}; known: {', '.join(spec)}")
        if not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{key}={value!r}: expected a positive integer")
        spec[key] = int(value)
    if spec["image_resolution"] % spec["vision_patch_size"]:
        raise argparse.ArgumentTypeError(
            f"image_resolution={spec['image_resolution']} is not a multiple of vision_patch_size="
            f"{spec['vision_patch_size']}: the image must cut into whole patches")
    if spec["width"] % _scratch_heads(spec["width"]):
        raise argparse.ArgumentTypeError(f"width={spec['width']} does not split into "
                                         f"{_scratch_heads(spec['width'])} equal heads (use a multiple of 64)")
    return spec


def _scratch_heads(width):
    return max(1, width // 64)  # OpenAI's 64-wide heads, and one head for narrower toys


def scratch_config(spec, vocab_size, quick_gelu=None):
    """The CLIPConfig of a model trained from scratch: both towers `width` wide and `layers` deep."""
    spec = dict(spec)
    w, layers = spec.pop("width"), spec.pop("layers")
    return CLIPConfig(**spec, vision_width=w, vision_layers=layers, vision_heads=_scratch_heads(w), text_width=w,
                      text_layers=layers, text_heads=_scratch_heads(w), vocab_size=vocab_size,
                      quick_gelu=True if quick_gelu is None else quick_gelu)


def train_option_errors(args):
    """What is wrong with a combination of train options, all checked here, before any work."""
    nce_scale_ok = args.nce_scale in (None, "model") or _positive_float(args.nce_scale)
    return [message for wrong, message in (
        (args.model is not None and args.scratch is not None,
         "give --model (fine-tune) or --scratch SPEC (pre-train), not both"),
        (args.scratch is not None and args.objective != "clip",
         f"--scratch needs --objective clip: a new model is pre-trained with CLIP's own loss; --objective "
         f"{args.objective} fine-tunes a trained one (--model)"),
        ({"text", "vision"} <= set(args.freeze or ()), "--freeze text vision leaves nothing to train; freeze one tower at most"),
        (args.objective == "clip" and args.lambdas, "--lambdas weighs the terms of a fine-tuning objective, not of --objective clip"),
        (args.offset is not None and args.objective not in ("twin-offset", "twin-gap"),
         "--offset only applies to --objective twin-offset and twin-gap"),
        (args.offset is not None and args.offset < 0, "--offset takes a number >= 0"),
        ((args.margin is not None or args.margin_tau is not None) and args.objective not in ("twin-margin", "twin-nce"),
         "--margin and --margin-tau only apply to --objective twin-margin and twin-nce"),
        (args.margin_tau is not None and args.margin_tau <= 0, "--margin-tau takes a positive number"),
        (args.nce_scale is not None and args.objective == "clip",
         "--nce-scale applies to a fine-tuning objective; --objective clip learns its own"),
        (not nce_scale_ok, f"--nce-scale takes a positive number or 'model', not {args.nce_scale!r}"),
        (args.compile and args.grad_checkpointing and "WORLD_SIZE" in os.environ,
         "--compile with --grad-checkpointing under torchrun is not supported (DDP's graph splitting and "
         "recomputed blocks); drop one of them"),
        (args.log_every is not None and args.log_every < 1, "--log-every takes a positive number of steps"),
    ) if wrong]


def _positive_float(text):
    try:
        return float(text) > 0
    except ValueError:
        return False


def cmd_train(args):
    errors = train_option_errors(args)
    if errors:
        raise SystemExit(f"error: {errors[0]}")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if config.objective != "clip":
        try:
            config.lambdas = parse_lambdas(config.lambdas, OBJECTIVES[config.objective].lambdas)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"error: {e}") from None
    train(config.resolved())


def cmd_export(args):
    if not (args.hf or args.openai):
        raise SystemExit("error: nothing to do; give --hf OUT and/or --openai OUT.pt")
    model, _ = load(args.checkpoint, tokenizer=args.tokenizer, quick_gelu=args.quick_gelu)
    if args.hf:
        export_hf(model, args.hf)
        print(f"wrote {args.hf} (transformers.CLIPModel.from_pretrained)")
    if args.openai:
        export_openai(model, args.openai)
        print(f"wrote {args.openai} (OpenAI state dict)")


def add_download_command(subparsers):
    """Register `download NAME [--dir weights] [--base-url URL]` on argparse `subparsers`."""
    models = "\n".join(f"  {name:<16}{url.rsplit('/', 1)[1]}"
                       for name, url in OPENAI_MODELS.items())
    parser = subparsers.add_parser(
        "download", help="download OpenAI's CLIP weights and the BPE vocabulary",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download OpenAI's CLIP weights and the BPE vocabulary into a folder, with a\n"
                    "progress bar. A cut download resumes when run again; every file is checked\n"
                    "against its SHA-256 before it appears under its name; files already present\n"
                    "and verified are not fetched again.",
        epilog=f"models (NAME, then the file it gives):\n{models}\n\n"
               "A mirror (--base-url URL, or SAFECLIP_BASE_URL) is laid out like OpenAI's\n"
               ".../clip/models/: URL/<sha256>/ViT-B-32.pt; the vocabulary is fetched from\n"
               f"URL/{VOCAB_FILE} unless the folder already holds it.")
    parser.add_argument("name", metavar="NAME",
                        help="model, e.g. ViT-B/32 or ViT-B-32 (list below)")
    parser.add_argument("--dir", help="folder for the files (default: weights/ beside safeclip.py, "
                        "or $SAFECLIP_WEIGHTS: where model names are looked for)")
    parser.add_argument("--base-url", metavar="URL",
                        help="mirror to download from (default: $SAFECLIP_BASE_URL, else OpenAI)")
    parser.set_defaults(func=_download_command)
    return parser


def _download_command(args):
    try:
        path = download(args.name, args.dir, args.base_url)
    except (ValueError, DownloadError) as err:
        sys.exit(f"error: {err}")
    print(path)


QUICK_GELU_HELP = ("the model's activation: QuickGELU (OpenAI's models) or, with --no-quick-gelu, exact GELU "
                   "(OpenCLIP's LAION models). Default: what the checkpoint records; a plain state dict records "
                   "nothing, and is then guessed from its width (QuickGELU below 1280)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not when its help already says it, nor when there is none."""

    def _get_help_string(self, action):
        if "default" in action.help.lower() or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="safeclip.py", description="Safe-CLIP: fine-tune CLIP so unsafe inputs land where their safe "
        "counterparts do. See README.md.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="typical use:\n  python safeclip.py train --data pairs.jsonl\n  python evaluate.py --ckpt runs/safeclip\n"
               "  python safeclip.py export runs/safeclip --hf runs/safeclip-hf\n\n"
               "python safeclip.py COMMAND --help describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = HelpFormatter

    t = sub.add_parser("train", formatter_class=fmt, help="fine-tune a CLIP with Safe-CLIP (or pre-train one)",
                       description="Fine-tune a CLIP with the Safe-CLIP objective on pairs.jsonl "
                       "quadruplets, or pre-train a small CLIP from scratch with --objective clip --scratch. "
                       "`train --data pairs.jsonl` alone fine-tunes OpenAI's ViT-L/14 (downloaded into the "
                       "weights folder if missing) with the paper's settings into runs/safeclip.")
    order = ("data and model", "objective", "what trains", "optimisation", "validation and checkpoints", "hardware")
    groups = {name: t.add_argument_group(name) for name in order}  # --help's sections, in this order
    for f in sorted(fields(TrainConfig), key=lambda f: order.index(f.metadata["group"])):
        cli = dict(f.metadata)
        group, parse = cli.pop("group"), cli.pop("parse", None)
        if f.type is bool and "action" not in cli:
            cli["action"] = "store_true"
        elif parse is not None:
            cli["type"] = globals()[parse] if parse != "str" else str
        elif f.type in (int, float):
            cli["type"] = f.type
        groups[group].add_argument("--" + f.name.replace("_", "-"), default=f.default, **cli)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", formatter_class=fmt, help="write a model for transformers or OpenAI's code",
                       description="Export a checkpoint (anything safeclip.load reads) to a Hugging Face "
                       "CLIPModel folder and/or an OpenAI-named state dict.")
    e.add_argument("checkpoint", help="a training --out folder, an OpenAI name (ViT-L/14) or any file safeclip.load reads")
    e.add_argument("--hf", metavar="OUT", help="Hugging Face CLIPModel folder to write")
    e.add_argument("--openai", metavar="OUT.pt", help="OpenAI-named state dict to write")
    e.add_argument("--tokenizer", metavar="PATH", help="tokenizer to attach, for weights without one")
    e.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, help=QUICK_GELU_HELP)
    e.set_defaults(func=cmd_export)

    add_download_command(sub)
    return parser


# The user's errors (data, settings, files, downloads): one line that says what to do. Anything
# else (out of memory, NCCL, the compiler, a bug) keeps its traceback: that is what debugs it.
USER_ERRORS = (DataError, CheckpointError, TrainingError, DownloadError, FileNotFoundError)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Stopped as e:  # SIGTERM or Ctrl-C: the checkpoint is written
        print(e, file=sys.stderr)
        return e.code
    except USER_ERRORS as e:
        print(f"error: {_own_message(e)}", file=sys.stderr)
        return 1
    return 0


def _own_message(error):
    """An error's own message. A data-loading worker's error reaches this process wrapped in the
    worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."), whose last line is the error itself."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())

"""Held-out tasks: the suite's protocol on four networks no default was developed on.

Why: ``bench/tasks.py`` has been read so often while changing ``auto`` that its five tasks are no longer a
fair test of whether the defaults generalise. The networks here were written after the last change to the
defaults and are run once, as they are. Each stresses a coupling the suite has little of:

* ``digits_dense``: a pre-activation DenseNet (every layer reads the concatenation of all before it through its
  own BatchNorm, so one BatchNorm covers channels of several producers), growth 12, two blocks and a transition;
* ``digits_resnext``: bottleneck residual blocks with grouped 3x3 convs (4 groups) and strided 1x1 shortcuts;
* ``digits_mixer``: an MLP-Mixer on 2x2 patches (16 tokens, width 64): token mixing is a linear over the token
  axis (a transpose before and after), channel mixing a linear over the features, pre-LayerNorm;
* ``signal_gated``: a WaveNet-style 1-D net on the suite's signals: dilated convs whose output is split in
  halves (``chunk``) into a tanh and a sigmoid gate, residual and skip outputs, the skips summed.

A second batch, written and run once in a later session (twentieth), after the defaults stopped changing:

* ``digits_gru``: a GRU reading each digit row by row, its last state into the head (a recurrent hidden unit is
  one across the three gates and the recurrence);
* ``digits_tabmlp``: the pixels as a table, an MLP with BatchNorm1d and dropout;
* ``digits_convmixer``: a ConvMixer, residual depthwise convs between pointwise ones, GELU and BatchNorm.

A third batch, written by a red-team session (survey 57, thirty-sixth session) and run once, 3 seeds, rows in
``bench/results/heldout3.json`` (``--out`` it):

* ``signal_unet1d``: a 1-D U-Net as a classifier, transposed-conv upsampling and skip concatenations;
* ``digits_clstf``: a CLS token over 2x2 patches through three ``nn.TransformerEncoderLayer`` (Torch-Pruning
  is given the head counts, ``mha_tp``);
* ``digits_shuffle``: a ShuffleNet v1, grouped 1x1 convs around a channel shuffle and a depthwise conv.

    OMP_NUM_THREADS=1 nice -n 12 .venv/bin/python bench/heldout.py --tasks signal_unet1d,digits_clstf,digits_shuffle \
        --seeds 0,1,2 --methods graphprune,tp_magnitude,tp_taylor --out bench/results/heldout3.json --resume

Same data splits, training, budgets, fine-tune and rivals as ``bench/tasks.py`` (its ``Run``); graphprune is
called as documented. Rows go to ``bench/results/heldout.json``; Torch-Pruning with the ignore lists it
needs (``RECIPES``) to ``heldout_recipes.json``, shown as ``tp_*_recipe`` columns:

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/heldout.py --methods graphprune,tp_magnitude,tp_taylor --resume
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/heldout.py --tp-recipes --methods tp_magnitude,tp_taylor \
        --tasks digits_mixer,signal_gated --resume
    .venv/bin/python bench/heldout.py --table
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

sys.path.append(str(Path(__file__).parent))
import accuracy_digits as digits  # noqa: E402
import tasks  # noqa: E402
from tasks import Task, conv_bn, conv_bn1d, signal_splits  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class DenseLayer(nn.Module):
    """BN-ReLU-conv 3x3 on everything so far; its ``growth`` new channels are concatenated on."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """8x8x1 -> conv 16 -> 4 dense layers (+12 each: 64) -> BN-ReLU-1x1 32, avgpool /2 -> 3 dense layers (68)
    -> BN-ReLU -> mean -> fc."""

    def __init__(self, growth: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        c, layers = 16, []
        for _ in range(4):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 32, 1, bias=False), nn.AvgPool2d(2))
        c, layers = 32, []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.fc(self.final(x).mean((2, 3)))


class Bottleneck(nn.Module):
    """1x1 -> grouped 3x3 (stride) -> 1x1, plus x (or a strided 1x1 projection of it), then ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int = 4):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.group = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(mid),
                                   nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.short(x) + self.expand(self.group(self.reduce(x))))


class ResNeXt(nn.Module):
    """8x8x1 -> conv 32 -> bottleneck(32, 32 in 4 groups, 64) -> bottleneck(64, 64, 64) -> bottleneck(64, 64, 128, /2)
    -> mean -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.blocks = nn.Sequential(Bottleneck(32, 32, 64, 1), Bottleneck(64, 64, 64, 1), Bottleneck(64, 64, 128, 2))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channels = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x):  # (B, tokens, dim)
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class Mixer(nn.Module):
    """8x8x1 -> 2x2 patches (16 tokens) -> width 64 -> 3 mixer blocks (token MLP 32, channel MLP 128) -> norm
    -> mean over tokens -> fc."""

    def __init__(self, dim: int = 64, depth: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.blocks = nn.Sequential(*(MixerBlock(16, dim, 32, 128) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.fc(self.norm(self.blocks(x)).mean(1))


class GatedLayer(nn.Module):
    """Dilated conv to 2C, halves as tanh(a) * sigmoid(b); a 1x1 to the residual, another to the skip."""

    def __init__(self, c: int, skip: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(c, 2 * c, 3, padding=dilation, dilation=dilation)
        self.res = nn.Conv1d(c, c, 1)
        self.skip = nn.Conv1d(c, skip, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        h = torch.tanh(a) * torch.sigmoid(b)
        return x + self.res(h), self.skip(h)


class Gated1d(nn.Module):
    """(1, 128) -> conv 32 (k5, /2) -> 6 gated layers (dilations 1, 2, 4, 8, 1, 2), skips (48) summed -> ReLU
    -> 1x1 64 -> ReLU -> mean over time -> fc."""

    def __init__(self, c: int = 32, skip: int = 48):
        super().__init__()
        self.stem = nn.Conv1d(1, c, 5, 2, 2)
        self.layers = nn.ModuleList([GatedLayer(c, skip, d) for d in (1, 2, 4, 8, 1, 2)])
        self.post = nn.Sequential(nn.ReLU(), nn.Conv1d(skip, 64, 1), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        total = 0
        for layer in self.layers:
            x, s = layer(x)
            total = total + s
        return self.fc(self.post(total).mean(2))


# ---------------------------------------------------------------- second batch (session of 2026-12-05, twentieth)


class DigitsGRU(nn.Module):
    """Each 8x8 digit read as 8 rows of 8 pixels: a linear 32 per row, ReLU, a GRU of 64, its last state -> fc."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.rnn = nn.GRU(32, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out, h = self.rnn(self.proj(x[:, 0]))  # (B, 8 rows, 64), (1, B, 64)
        return self.fc(h[-1])


class TabMLP(nn.Module):
    """The 64 pixels as a table: 256-256-128 with BatchNorm1d and dropout 0.2, the way tabular MLPs are written."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, 128), nn.ReLU())
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.body(x.flatten(1)))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class ConvMixer(nn.Module):
    """ConvMixer (Trockman and Kolter, 2022) at width 64, depth 4, patch 1: residual depthwise 3x3 + GELU + BN,
    then pointwise + GELU + BN."""

    def __init__(self, dim: int = 64, depth: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU(), nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)])
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# ---------------------------------------------------------------- third batch: written by a red-team session (survey 57), run once


class DoubleConv1d(nn.Sequential):
    """Two conv-BN-ReLU, the U-Net way."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(conv_bn1d(cin, cout, k), conv_bn1d(cout, cout, k))


class UNet1d(nn.Module):
    """A 1-D U-Net used as a classifier on the suite's signals: (1, 128) -> enc 16 (k5) @128 -> pool -> enc 32 @64
    -> pool -> enc 64 @32 -> pool -> bottleneck 96 @16 -> up (transposed conv, x2) to 64, cat enc 64 -> dec 64
    -> up to 32, cat enc 32 -> dec 32 @64; the decoder's and the bottleneck's time means concatenated (128) -> fc."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2, self.enc3 = DoubleConv1d(1, 16, 5), DoubleConv1d(16, 32), DoubleConv1d(32, 64)
        self.pool = nn.MaxPool1d(2)
        self.bottleneck = DoubleConv1d(64, 96)
        self.up3, self.dec3 = nn.ConvTranspose1d(96, 64, 2, 2), DoubleConv1d(128, 64)
        self.up2, self.dec2 = nn.ConvTranspose1d(64, 32, 2, 2), DoubleConv1d(64, 32)
        self.fc = nn.Linear(32 + 96, 10)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        return self.fc(torch.cat([d2.mean(2), b.mean(2)], 1))


class PatchTransformer(nn.Module):
    """8x8x1 -> 16 flattened 2x2 patches -> linear 64, a learned CLS token prepended, learned positions (17)
    -> ``nn.TransformerEncoder`` of 3 ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 128, GELU, dropout 0.1,
    pre-norm, batch first) -> LayerNorm of the CLS token -> fc."""

    def __init__(self, dim: int = 64, heads: int = 4, ff: int = 128, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        b = x.shape[0]
        patches = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        tokens = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1) + self.pos
        return self.fc(self.norm(self.encoder(tokens))[:, 0])


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet (v1) unit: grouped 1x1 -> BN-ReLU -> channel shuffle -> depthwise 3x3 (stride) -> BN -> grouped 1x1
    -> BN; added to x (stride 1) or concatenated to a 3x3 average pool of x (stride 2); then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int = 4):
        super().__init__()
        mid, out = cout // 4, (cout - cin if stride == 2 else cout)
        self.groups, self.stride = groups, stride
        self.gconv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
        self.gconv2 = nn.Sequential(nn.Conv2d(mid, out, 1, groups=groups, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.gconv2(self.dw(channel_shuffle(self.gconv1(x), self.groups)))
        if self.stride == 2:
            return torch.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], 1))
        return torch.relu(x + y)


class ShuffleNet(nn.Module):
    """8x8x1 -> conv 24 -> unit(24 -> 96, /2) -> 2 units(96) -> unit(96 -> 192, /2) -> unit(192) -> mean -> fc;
    groups 4 throughout."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 24)
        self.stages = nn.Sequential(ShuffleUnit(24, 96, 2), ShuffleUnit(96, 96, 1), ShuffleUnit(96, 96, 1),
                                    ShuffleUnit(96, 192, 2), ShuffleUnit(192, 192, 1))
        self.fc = nn.Linear(192, 10)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def mha_tp(model: nn.Module) -> dict:
    """Torch-Pruning's documented way to declare attention heads (as the suite's ViT gets): no ignore list."""
    return {"num_heads": {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}}


THIRD = {t.name: t for t in (
    Task("signal_unet1d", UNet1d, signal_splits, 20, 3e-3),
    Task("digits_clstf", PatchTransformer, digits.load_splits, 40, 2e-3, tp_kw=mha_tp),
    Task("digits_shuffle", ShuffleNet, digits.load_splits, 20, 3e-3),
)}


def ignoring(*suffixes: str):
    """A Torch-Pruning recipe: the layers a user must list in ``ignored_layers`` before it runs at all."""
    return lambda model: {"ignored_layers": [m for n, m in model.named_modules() if n.endswith(suffixes)]}


# Torch-Pruning 1.6 as given raises on two of these (the rows of heldout.json with "error"): on the Mixer
# (IndexError: the token-mixing linear's 16 outputs pruned as features) and on the gated net (a size
# mismatch at the residual add after the chunk). With ``--tp-recipes`` it gets the hand-written ignore
# lists that make it run: the token mixers' output layers; the gated and residual convs (ignoring the
# gated convs alone still raised). graphprune gets no list.
RECIPES = {"digits_mixer": ignoring("tokens.2"), "signal_gated": ignoring(".conv", ".res")}

HELDOUT = {t.name: t for t in (
    Task("digits_dense", DenseNet, digits.load_splits, 15, 3e-3),
    Task("digits_resnext", ResNeXt, digits.load_splits, 15, 3e-3),
    Task("digits_mixer", Mixer, digits.load_splits, 40, 2e-3),
    Task("signal_gated", Gated1d, signal_splits, 20, 3e-3),
    Task("digits_gru", DigitsGRU, digits.load_splits, 30, 3e-3),
    Task("digits_tabmlp", TabMLP, digits.load_splits, 30, 1e-3),
    Task("digits_convmixer", ConvMixer, digits.load_splits, 15, 3e-3),
    *THIRD.values(),
)}


def table() -> str:
    """The suite's tables for heldout.json, with heldout_recipes.json's rows as ``tp_*_recipe`` columns
    (and its plot, ``heldout.png``)."""
    rows = tasks.load(OUT)["rows"]
    if RECIPE_OUT.exists():
        rows += [{**r, "method": r["method"] + "_recipe"} for r in tasks.load(RECIPE_OUT)["rows"]
                 if r["method"].startswith("tp_")]
    summary = tasks.summarise(rows)
    rivals = ("tp_magnitude", "tp_taylor", "tp_magnitude_recipe", "tp_taylor_recipe")
    tasks.plot(summary, OUT.with_suffix(".png"), ("graphprune",) + rivals)
    return tasks.table(summary, ("graphprune",) + rivals) + "\n" + tasks.paired_table(tasks.paired(summary, rivals=rivals))


OUT = tasks.RESULTS / "heldout.json"
RECIPE_OUT = tasks.RESULTS / "heldout_recipes.json"


def main():
    tasks.TASKS.clear()
    tasks.TASKS.update(HELDOUT)  # tasks.main's --tasks default and checks read this table
    if "--table" in sys.argv:
        print(table())
        return
    out = OUT
    if "--tp-recipes" in sys.argv:
        sys.argv.remove("--tp-recipes")
        for name, recipe in RECIPES.items():
            tasks.TASKS[name] = replace(HELDOUT[name], tp_kw=recipe)
        out = RECIPE_OUT
    if not any(a.startswith("--out") for a in sys.argv):
        sys.argv += ["--out", str(out)]
    tasks.main()


if __name__ == "__main__":
    main()

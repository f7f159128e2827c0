"""Recovery by knowledge distillation: the original teaches its pruned copy (graphprune/distill.py)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import graphprune
from graphprune.distill import _output_loss, distill, distill_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only contend (50x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _kl(student, teacher, xs):
    """KL(teacher || student) on held-out inputs, computed here independently of distill.py."""
    with torch.no_grad():
        t = torch.cat([teacher(x) for x in xs])
        s = torch.cat([student(x) for x in xs])
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()


def _mlp_setup(seed=0):
    torch.manual_seed(seed)
    teacher = _mlp().eval()
    x = torch.randn(8, 16)
    student = graphprune.compile(teacher, (x,), ratio=0.5, output="graph")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    train = [(torch.randn(32, 16),) for _ in range(8)]
    held = [torch.randn(64, 16) for _ in range(4)]
    return teacher, student, train, held


def test_mlp_graph_student_gets_closer_and_teacher_is_untouched():
    teacher, student, train, held = _mlp_setup()
    assert isinstance(student, torch.fx.GraphModule)
    assert graphprune.count_params(student) < graphprune.count_params(teacher)
    teacher.train()  # distill runs it in eval mode and puts it back as it was
    before_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _kl(student, teacher.eval(), held)
    teacher.train()
    out = distill(student, teacher, train, steps=50, lr=1e-2, progress=False)
    assert out is student
    assert teacher.training
    assert all(torch.equal(before_state[k], v) for k, v in teacher.state_dict().items())
    after = _kl(student, teacher.eval(), held)
    assert after < 0.5 * before, (before, after)
    rep = student.distill_report
    assert set(rep) == {"steps", "seconds", "first_loss", "last_loss", "last_lr"}
    assert rep["steps"] == 50 and rep["seconds"] > 0 and rep["last_loss"] < rep["first_loss"]
    assert all(p.grad is None for p in student.parameters())
    # distill_loss measures the same KL (mean over rows)
    assert distill_loss(student, teacher, [(x,) for x in held]) == pytest.approx(after, rel=1e-4)


def test_deterministic_under_manual_seed():
    teacher, base, train, _ = _mlp_setup()
    runs = []
    for _ in range(2):
        student = copy.deepcopy(base)
        torch.manual_seed(123)  # the LoRA factors are drawn at random
        distill(student, teacher, train, steps=20, lr=1e-2, lora_rank=2, progress=False)
        runs.append((student.state_dict(), student.distill_report))
    (a, ra), (b, rb) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ra["first_loss"], ra["last_loss"]) == (rb["first_loss"], rb["last_loss"])
    assert not all(torch.equal(a[k], base.state_dict()[k]) for k in a)  # it did train


def test_refusals_and_stops():
    teacher, student, train, _ = _mlp_setup()
    with pytest.raises(graphprune.GraphpruneError, match="in place"):
        distill(teacher, teacher, train, steps=2, progress=False)
    view = nn.Sequential(teacher[0])  # shares the teacher's first layer
    with pytest.raises(graphprune.GraphpruneError, match="shares tensors"):
        distill(view, teacher, train, steps=2, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="schedule"):
        distill(student, teacher, train, steps=2, schedule="linear", progress=False)
    distill(student, teacher, train, steps=50, max_seconds=0, progress=True, schedule="constant")  # rich bar, one step
    assert student.distill_report["steps"] == 1
    with pytest.warns(UserWarning, match="ran out after 3 of 10"):
        distill(student, teacher, iter(train[:3]), steps=10, progress=False)
    assert student.distill_report["steps"] == 3


def test_padded_positions_do_not_count():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    s2 = s.clone()
    s2[1, 3:, 0] = 100.0  # far from the teacher where padded
    a, b = _output_loss(s, t, mask, 2.0, None), _output_loss(s2, t, mask, 2.0, None)
    assert a.item() == pytest.approx(b.item())
    assert _output_loss(s2, t, None, 2.0, None).item() > 10 * a.item()
    assert _output_loss(t, t, mask, 2.0, None).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------- a tiny Llama, module and graph form

transformers = pytest.importorskip("transformers")
VOCAB = 100


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    teacher = _llama().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    student = graphprune.compile(teacher, (ids,), ratio=0.25)
    assert student.report.form == "module" and type(student) is type(teacher)
    train = [{"input_ids": torch.randint(0, VOCAB, (4, 16))} for _ in range(8)]
    held = [{"input_ids": torch.randint(0, VOCAB, (4, 16))} for _ in range(4)]
    return teacher, student, ids, train, held


def _shapes(m):
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


def _clean(m):
    """No parametrization, hook or extra module left."""
    return (not any(parametrize.is_parametrized(x) or x._forward_hooks or x._forward_pre_hooks for x in m.modules())
            and not any("parametrizations" in k for k in m.state_dict()))


def test_llama_module_form_full_and_lora(llama):
    teacher, base, _, train, held = llama
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    start = distill_loss(base, teacher, held)
    assert start > 0

    full = distill(copy.deepcopy(base), teacher, train, steps=40, lr=1e-3, progress=False)
    assert distill_loss(full, teacher, held) < 0.7 * start

    student = copy.deepcopy(base)
    shapes, classes = _shapes(student), [type(x) for x in student.modules()]
    frozen = {n: p.clone() for n, p in student.named_parameters() if "proj" not in n and "lm_head" not in n}
    grads = {n: p.requires_grad for n, p in student.named_parameters()}
    out = distill(student, teacher, train, steps=40, lr=1e-2, lora_rank=4, progress=False)
    assert out is student and type(student) is type(teacher)
    assert distill_loss(student, teacher, held) < 0.85 * start
    assert _shapes(student) == shapes and [type(x) for x in student.modules()] == classes and _clean(student)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == grads
    named = dict(student.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())  # embeddings and norms were frozen
    lin = student.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(lin, dict(base.named_parameters())["model.layers.0.mlp.down_proj.weight"])  # merged update
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())
    with torch.no_grad():  # still the user's class with its generate()
        assert student.generate(train[0]["input_ids"][:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_llama_graph_form_lora(llama):
    """An exported graph calls aten.linear on parameters of plain holder modules: those take the low-rank update."""
    teacher, _, ids, train, held = llama
    student = graphprune.compile(teacher, (ids,), ratio=0.25, output="graph")
    assert isinstance(student, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.Linear) for m in student.modules())
    shapes = _shapes(student)
    start = distill_loss(student, teacher, held)
    distill(student, teacher, train, steps=40, lr=1e-2, lora_rank=4, progress=False)
    assert distill_loss(student, teacher, held) < 0.85 * start
    assert _shapes(student) == shapes and _clean(student)


def test_hidden_states_matched_where_shapes_agree(llama):
    teacher, pruned, _, train, held = llama
    torch.manual_seed(1)
    student = copy.deepcopy(teacher)  # same widths: every hidden state matches
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def hidden_mse(m):
        with torch.no_grad():
            a = m(**held[0], output_hidden_states=True, use_cache=False).hidden_states
            b = teacher(**held[0], output_hidden_states=True, use_cache=False).hidden_states
        return sum(F.mse_loss(x, y).item() for x, y in zip(a, b))

    plain = distill(copy.deepcopy(student), teacher, train, steps=30, lr=1e-3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer matched: no warning
        distill(student, teacher, train, steps=30, lr=1e-3, hidden_weight=10.0, progress=False)
    assert hidden_mse(student) < 0.7 * hidden_mse(plain), (hidden_mse(student), hidden_mse(plain))
    with pytest.warns(UserWarning, match="no hidden state of the student has the shape"):  # a narrower residual stream
        distill(copy.deepcopy(pruned), teacher, train, steps=1, hidden_weight=1.0, progress=False)


def test_a_time_limit_is_the_cosine_horizon():
    """steps far beyond what max_seconds allows: the rate still decays to about 0 by the time limit."""
    teacher, base, train, _ = _mlp_setup()
    student = copy.deepcopy(base)
    distill(student, teacher, train, steps=10**7, lr=1e-2, max_seconds=1.0, progress=False)
    rep = student.distill_report
    assert 1 < rep["steps"] < 10**7 and rep["seconds"] >= 1.0
    assert rep["last_lr"] < 0.05 * 1e-2
    constant = copy.deepcopy(base)
    distill(constant, teacher, train, steps=10**7, lr=1e-2, max_seconds=0.3, schedule="constant", progress=False)
    assert constant.distill_report["last_lr"] == 1e-2


def test_a_student_in_training_keeps_its_frozen_batchnorms_frozen():
    """distill put the whole student in training mode: BatchNorms its user froze (eval, no grad)
    had their running statistics overwritten, and the mode put back afterwards hid it (survey 26)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    with torch.no_grad():
        teacher[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    student = graphprune.compile(teacher.eval(), (x,), ratio=0.5, importance="l2").train()
    student[1].eval().requires_grad_(False)
    stats = student[1].running_mean.clone()
    distill(student, teacher, [(torch.randn(4, 3, 6, 6),) for _ in range(3)], steps=3, progress=False)
    torch.testing.assert_close(student[1].running_mean, stats, rtol=0, atol=0)
    assert student.training and not student[1].training
    fresh = graphprune.compile(teacher, (x,), ratio=0.5, importance="l2")  # an eval student trains whole, as before
    before = fresh[1].running_mean.clone()
    distill(fresh, teacher, [(torch.randn(4, 3, 6, 6),) for _ in range(3)], steps=3, progress=False)
    assert not torch.equal(fresh[1].running_mean, before) and not fresh.training


def test_a_batch_the_models_cannot_take_is_a_graphprune_error():
    """The model's own RuntimeError came through, where recalibrate_bn and compile say what to give (survey 26)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    student = graphprune.compile(teacher, (torch.randn(2, 8),), ratio=0.5, importance="l2")
    with pytest.raises(graphprune.GraphpruneError, match="does not fit the models"):
        distill(student, teacher, [(torch.randn(2, 5),)], steps=2, progress=False)

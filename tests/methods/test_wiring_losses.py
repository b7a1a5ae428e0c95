"""Hand-built expected losses of one pre-training and one fine-tuning step (tests that catch wiring bugs).

Each term is recomputed here from the model's sub-modules with naive loops (no call into ``mics.losses``),
with every weight distinct, so a swapped weight, a dropped or doubled term, a wrong modality routed into a
term or a wrong sign changes the total.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from mics.config import preset
from mics.engine.train import StepInfo
from mics.methods.finetune import FusionFinetuning
from mics.methods.pretrain import SynergisticPretraining
from mics.methods.svd import ShiftDictionary

CFG = preset("smoke")
SIZE = CFG.data.image_size
B = 4


def _info(epoch: int = 0, progress: float = 0.5, seed: int = 3) -> StepInfo:
    return StepInfo(
        epoch=epoch,
        step=0,
        total_steps=10,
        epoch_progress=progress,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------- naive references ----------


def _patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    n, c, h, w = imgs.shape
    out = torch.zeros(n, (h // p) * (w // p), p * p * c)
    for i in range(h // p):
        for j in range(w // p):
            patch = imgs[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # [n, c, p, p]
            out[:, i * (w // p) + j] = patch.permute(0, 2, 3, 1).reshape(n, -1)
    return out


def _masked_mse(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _soft_ce_direction(q, q_m, keys, key_idx, idx, temp, alpha):
    total = 0.0
    for i in range(q.shape[0]):
        logits = torch.stack([q[i] @ k for k in keys]) / temp
        logits_m = torch.stack([q_m[i] @ k for k in keys]) / temp
        same = torch.tensor([float(key_idx[j] == idx[i]) for j in range(len(keys))])
        target = alpha * logits_m.softmax(0) + (1 - alpha) * same / same.sum()
        total = total - (target * logits.log_softmax(0)).sum()
    return total / q.shape[0]


def _info_nce(g_a, g_b, temp):
    a, b = F.normalize(g_a, dim=1), F.normalize(g_b, dim=1)
    n = a.shape[0]
    loss = 0.0
    for i in range(n):
        row = torch.stack([a[i] @ b[j] for j in range(n)]) / temp
        col = torch.stack([a[j] @ b[i] for j in range(n)]) / temp
        loss = loss - row.log_softmax(0)[i] - col.log_softmax(0)[i]
    return loss / (2 * n)


def _kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    s = alpha.sum()
    c = alpha.shape[0]
    out = torch.lgamma(s) - sum(torch.lgamma(a) for a in alpha) - math.lgamma(c)
    return out + sum((a - 1) * (torch.digamma(a) - torch.digamma(s)) for a in alpha)


def _evidential(alpha: torch.Tensor, y: torch.Tensor, lam: float, w: torch.Tensor) -> torch.Tensor:
    total, norm = 0.0, 0.0
    for i in range(alpha.shape[0]):
        a = alpha[i].double()
        onehot = F.one_hot(y[i], a.shape[0]).double()
        ce = torch.digamma(a.sum()) - torch.digamma(a[y[i]])
        kl = _kl_to_uniform(onehot + (1 - onehot) * a)
        total = total + w[i] * (ce + lam * kl)
        norm = norm + w[i]
    return total / norm


def _ds(alpha1: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
    out = []
    c = alpha1.shape[1]
    for x1, x2 in zip(alpha1.double(), alpha2.double(), strict=True):
        s1, s2 = x1.sum(), x2.sum()
        b1, b2, u1, u2 = (x1 - 1) / s1, (x2 - 1) / s2, c / s1, c / s2
        conflict = sum(b1[i] * b2[j] for i in range(c) for j in range(c) if i != j)
        b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - conflict)
        u = u1 * u2 / (1 - conflict)
        out.append(b * (c / u) + 1)
    return torch.stack(out)


def _weighted_ce(logits: torch.Tensor, y: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    num = sum(-cw[y[i]] * logits[i].log_softmax(0)[y[i]] for i in range(len(y)))
    return num / sum(cw[y[i]] for i in range(len(y)))


# ---------- pre-training ----------


def test_pretraining_step_equals_hand_built_eq9():
    torch.manual_seed(0)
    cfg = replace(
        CFG.pretrain,
        w_consistency=0.3,
        w_reconstruction=2.0,
        w_alignment=0.7,
        momentum=0.5,
        alpha=0.4,
        queue_size=8,
        queue_positives="index",
        reconstruction_reduce="sum",
    )
    model = SynergisticPretraining(CFG.model, cfg, SIZE, n_train=8, global_batch=B)
    with torch.no_grad():  # make the momentum copies differ from the online encoders
        for p in model.enc_a_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.queue_a.index.copy_(torch.tensor([5, 2, -1, 7, 0, 6, 4, 1]))
    a, b = torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)
    index = torch.tensor([2, 3, 5, 9])
    ref = copy.deepcopy(model)

    torch.manual_seed(11)
    loss, logs = model({"a": a, "b": b, "index": index}, _info(epoch=0, progress=0.5))

    m = cfg.momentum
    with torch.no_grad():
        for online, target in ref.momentum_pairs():
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.copy_(m * pt + (1 - m) * po)
        z_a_m = F.normalize(ref.proj_a_m.proj(ref.enc_a_m(a)[:, 0]), dim=1)
        z_b_m = F.normalize(ref.proj_b_m.proj(ref.enc_b_m(b)[:, 0]), dim=1)
        q_a, q_b, q_idx = ref.queue_a.queue.clone(), ref.queue_b.queue.clone(), ref.queue_a.index.clone()
        cls_a, cls_b = ref.enc_a(a)[:, 0], ref.enc_b(b)[:, 0]
        z_a, z_b = F.normalize(ref.proj_a.proj(cls_a), dim=1), F.normalize(ref.proj_b.proj(cls_b), dim=1)
        alpha = 0.4 * 0.5  # ramped over the first epoch
        key_idx = torch.cat([index, q_idx])
        temp = ref.temp.clamp(0.001, 0.5)
        l_ab = _soft_ce_direction(z_a, z_a_m, torch.cat([z_b_m, q_b]), key_idx, index, temp, alpha)
        l_ba = _soft_ce_direction(z_b, z_b_m, torch.cat([z_a_m, q_a]), key_idx, index, temp, alpha)
        l_cons = (l_ab + l_ba) / 2

        torch.manual_seed(11)
        rec = 0.0
        for enc, x in ((ref.enc_a, a), (ref.enc_b, b)):
            tokens, mask, ids_restore = enc.forward_masked(x, cfg.mask_ratio)
            rec = rec + _masked_mse(
                _patchify(x, CFG.model.patch_size), ref.decoder(tokens, ids_restore), mask
            )
        l_align = _info_nce(ref.gloe_a.net(cls_a), ref.gloe_b.net(cls_b), ref.temp_align.clamp(0.001, 0.5))

    torch.testing.assert_close(logs["l_cons"], l_cons, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logs["l_res"], rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["l_align"], l_align, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), 0.3 * l_cons + 2.0 * rec + 0.7 * l_align, rtol=1e-5, atol=1e-5)
    # the momentum features of this batch are queued, with their sample indices, after the loss
    torch.testing.assert_close(model.queue_a.queue[:B], z_a_m)
    torch.testing.assert_close(model.queue_b.queue[:B], z_b_m)
    assert model.queue_a.index[:B].tolist() == index.tolist()


def test_index_positives_change_the_loss_only_where_the_queue_holds_the_sample():
    torch.manual_seed(1)
    base = replace(CFG.pretrain, reconstruction=False, alignment=False, queue_size=8, queue_positives="index")
    by_index = SynergisticPretraining(CFG.model, base, SIZE, n_train=8, global_batch=B)
    by_batch = SynergisticPretraining(
        CFG.model, replace(base, queue_positives="batch"), SIZE, n_train=8, global_batch=B
    )
    by_batch.load_state_dict(by_index.state_dict(), strict=False)
    batch = {"a": torch.randn(B, 3, SIZE, SIZE), "b": torch.randn(B, 3, SIZE, SIZE), "index": torch.arange(B)}
    # empty index queue (-1): the two wirings agree
    same = [copy.deepcopy(m)(batch, _info(epoch=2))[0] for m in (by_index, by_batch)]
    torch.testing.assert_close(same[0], same[1])
    # the queue holds sample 0's earlier feature: treated as a positive, the loss differs
    with torch.no_grad():
        by_index.queue_a.index[3] = 0
    differ = [copy.deepcopy(m)(batch, _info(epoch=2))[0] for m in (by_index, by_batch)]
    assert not torch.allclose(differ[0], differ[1])


def test_reconstruction_reduce_mean_is_half_the_sum():
    torch.manual_seed(2)
    cfg = replace(CFG.pretrain, consistency=False, alignment=False, reconstruction_reduce="sum")
    m_sum = SynergisticPretraining(CFG.model, cfg, SIZE, n_train=8, global_batch=B)
    m_mean = SynergisticPretraining(
        CFG.model, replace(cfg, reconstruction_reduce="mean"), SIZE, n_train=8, global_batch=B
    )
    m_mean.load_state_dict(m_sum.state_dict())
    batch = {"a": torch.randn(B, 3, SIZE, SIZE), "b": torch.randn(B, 3, SIZE, SIZE)}
    torch.manual_seed(5)
    l_sum = m_sum(batch, _info())[1]["l_res"]
    torch.manual_seed(5)
    l_mean = m_mean(batch, _info())[1]["l_res"]
    torch.testing.assert_close(l_sum, 2 * l_mean)


# ---------- fine-tuning ----------


def _finetune(num_classes: int = 3, **switches) -> FusionFinetuning:
    torch.manual_seed(4)
    switches = {"fused_evidence": "classifier", **switches}
    cfg = replace(CFG.finetune, annealing_epochs=4, **switches)
    model = FusionFinetuning(CFG.model, cfg, replace(CFG.svd, calibrate="fused"), SIZE, num_classes)
    d, p = CFG.model.width, 5
    model.set_dictionaries(
        ShiftDictionary(torch.randn(num_classes, d), 3.0 * torch.randn(num_classes, p, d)),
        ShiftDictionary(torch.randn(num_classes, d), 0.5 * torch.randn(num_classes, p, d)),
    )
    return model


def _nearest(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return torch.tensor([min(range(len(protos)), key=lambda j: float((f - protos[j]).norm())) for f in feats])


def test_finetuning_step_equals_hand_built_eq15_plus_etmc():
    model = _finetune()
    with torch.no_grad():
        model.class_weights.copy_(torch.tensor([1.0, 2.0, 0.5]))
    a, b = torch.randn(6, 3, SIZE, SIZE), torch.randn(6, 3, SIZE, SIZE)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    loss, logs = model({"a": a, "b": b, "y": y}, _info(epoch=1, seed=9))

    with torch.no_grad():
        feats = model.encode(a, b)
        z, cls_a, cls_b = feats["z"], feats["cls_a"], feats["cls_b"]
        cw = model.class_weights
        gen = torch.Generator().manual_seed(9)
        l_ce = _weighted_ce(model.classifier(z), y, cw)
        total = l_ce
        shifts, l_shift = {}, {}
        for which, own in (("a", cls_a), ("b", cls_b)):
            protos, bank = getattr(model, f"svd_{which}_prototypes"), getattr(model, f"svd_{which}_shifts")
            pick = torch.randint(0, bank.shape[1], (6,), generator=gen)
            s = bank[_nearest(own, protos), pick] * (z.norm(dim=1).mean() / own.norm(dim=1).mean())
            shifts[which] = s
            l_shift[which] = _weighted_ce(model.classifier(z + s), y, cw)
            total = total + l_shift[which]
        lam = 0.5  # min(1, (epoch + 1) / annealing_epochs) = 2 / 4
        w = cw[y]
        alpha_a = F.softplus(model.evidence_a.fc(cls_a)) + 1
        alpha_b = F.softplus(model.evidence_b.fc(cls_b)) + 1
        alpha_f = F.softplus(model.classifier(z)) + 1  # the Eq. 15 classifier is the fused view
        views = sum(_evidential(al, y, lam, w) for al in (alpha_a, alpha_b, alpha_f))
        combined = _ds(_ds(alpha_a, alpha_b), alpha_f)
        l_fuse = _evidential(combined, y, lam, w)
        total = total + views + l_fuse

    torch.testing.assert_close(logs["l_ce"], l_ce, rtol=1e-5, atol=1e-5)
    for which in ("a", "b"):
        torch.testing.assert_close(logs[f"l_shift_{which}"], l_shift[which], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logs["l_views"].double(), views, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logs["l_fuse"].double(), l_fuse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach().double(), total.double(), rtol=1e-5, atol=1e-5)
    for which in ("a", "b"):
        ratio = shifts[which].norm(dim=1).mean() / z.norm(dim=1).mean()
        torch.testing.assert_close(logs[f"shift_ratio_{which}"], ratio, rtol=1e-5, atol=1e-6)


def test_the_classification_loss_uses_the_configured_label_smoothing():
    model = _finetune(use_tmc=False, use_svd=False, label_smoothing=0.2)
    a, b, y = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 1])
    _, logs = model({"a": a, "b": b, "y": y}, _info())
    with torch.no_grad():
        logits = model.classifier(model.encode(a, b)["z"])
    torch.testing.assert_close(logs["l_ce"], F.cross_entropy(logits, y, label_smoothing=0.2))
    assert not torch.allclose(logs["l_ce"], F.cross_entropy(logits, y))


def test_the_shift_ratio_is_exact_for_fused_features_shorter_than_one():
    """The logged ||s|| / ||z^f|| divides by the mean norm as it is (the clamp only guards against 0)."""
    model = _finetune(use_tmc=False)
    model.svd_cfg = replace(model.svd_cfg, calibrate="none")
    with torch.no_grad():
        model.fusion.norm.weight.mul_(0.01)  # ||z^f|| well below 1
    a, b, y = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 1])
    _, logs = model({"a": a, "b": b, "y": y}, _info(seed=2))
    with torch.no_grad():
        feats = model.encode(a, b)
        z_norm = feats["z"].norm(dim=1).mean()
        assert z_norm < 0.5
        s = model.shift("a", feats, torch.Generator().manual_seed(2))
    torch.testing.assert_close(logs["shift_ratio_a"], s.norm(dim=1).mean() / z_norm, rtol=1e-5, atol=1e-6)


def test_opinions_compute_the_classifier_logits_when_not_given_and_the_fused_head_adds_one():
    model = _finetune()
    feats = model.encode(torch.randn(3, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE))
    with torch.no_grad():
        given = model.opinions(feats, model.classifier(feats["z"]))
        computed = model.opinions(feats)
    for x, y in zip(given, computed, strict=True):
        torch.testing.assert_close(x, y)
    head = _finetune(fused_evidence="head")
    with torch.no_grad():
        alpha_f = head.opinions(feats)[-1]
        torch.testing.assert_close(alpha_f, F.softplus(head.evidence_f.fc(feats["z"])) + 1)


def test_a_modality_without_a_dictionary_or_a_feature_gets_no_shift():
    model = _finetune(use_tmc=False)
    feats = {"cls_a": torch.randn(4, CFG.model.width), "z": torch.randn(4, CFG.model.width)}
    assert model.shift("b", feats, torch.Generator().manual_seed(0)) is None  # no cls_b
    bare = FusionFinetuning(CFG.model, replace(CFG.finetune, use_tmc=False), CFG.svd, SIZE, 3)
    feats["cls_b"] = torch.randn(4, CFG.model.width)
    assert bare.shift("a", feats, None) is None and bare.shift("b", feats, None) is None


def test_calibrated_shifts_divide_by_the_feature_norm_as_it_is():
    """``calibrate="fused"`` rescales by mean ||z^f|| / mean ||feature||; the clamp only guards against 0,
    so features shorter than 1 are divided by their own norm too."""
    model = _finetune(use_tmc=False)
    feats = {"cls_a": 0.01 * torch.randn(4, CFG.model.width), "z": torch.randn(4, CFG.model.width)}
    s = model.shift("a", feats, torch.Generator().manual_seed(1))
    pick = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(1))
    raw = model.svd_a_shifts[_nearest(feats["cls_a"], model.svd_a_prototypes), pick]
    ratio = feats["z"].norm(dim=1).mean() / feats["cls_a"].norm(dim=1).mean()
    torch.testing.assert_close(s, raw * ratio)


def test_uncalibrated_shifts_are_the_dictionary_vectors():
    model = _finetune(use_tmc=False)
    model.svd_cfg = replace(model.svd_cfg, calibrate="none")
    feats = {"cls_a": torch.randn(6, CFG.model.width), "z": 10 * torch.randn(6, CFG.model.width)}
    s = model.shift("a", feats, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    pick = torch.randint(0, 5, (6,), generator=gen)
    torch.testing.assert_close(s, model.svd_a_shifts[_nearest(feats["cls_a"], model.svd_a_prototypes), pick])


def test_prediction_follows_predict_from():
    model = _finetune().eval()
    a, b = torch.randn(5, 3, SIZE, SIZE), torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model.encode(a, b)
        logits = model.classifier(feats["z"])
        alphas = [
            F.softplus(model.evidence_a.fc(feats["cls_a"])) + 1,
            F.softplus(model.evidence_b.fc(feats["cls_b"])) + 1,
            F.softplus(logits) + 1,
        ]
        combined = _ds(_ds(alphas[0], alphas[1]), alphas[2])
    pred = model.predict(a, b)
    torch.testing.assert_close(
        pred.probs.double(), combined / combined.sum(1, keepdim=True), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(pred.uncertainty.double(), 3 / combined.sum(1), rtol=1e-5, atol=1e-6)
    model.cfg = replace(model.cfg, predict_from="classifier")
    pred_cls = model.predict(a, b)
    torch.testing.assert_close(pred_cls.probs, logits.softmax(dim=1))
    torch.testing.assert_close(pred_cls.uncertainty, pred.uncertainty)  # u stays the combined opinion's


def test_head_wiring_keeps_the_first_versions_losses():
    model = _finetune(fused_evidence="head")
    assert hasattr(model, "evidence_f")
    a, b = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE)
    y = torch.tensor([0, 1, 2, 0])
    _, logs = model({"a": a, "b": b, "y": y}, _info(epoch=3))
    with torch.no_grad():
        feats = model.encode(a, b)
        w = torch.ones(4)
        alpha_a = F.softplus(model.evidence_a.fc(feats["cls_a"])) + 1
        alpha_b = F.softplus(model.evidence_b.fc(feats["cls_b"])) + 1
        views = _evidential(alpha_a, y, 1.0, w) + _evidential(alpha_b, y, 1.0, w)  # no loss on the fused head
    torch.testing.assert_close(logs["l_views"].double(), views, rtol=1e-5, atol=1e-5)

"""The model out: ONNX and .pt exports give the torch model's predictions; `crowdtrain export`,
`crowdtrain eval` and ``GET /api/v1/model``."""
import asyncio
import json
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

import crowdtrain
from contract.codecs import decode_delta, encode_delta, get_codec
from contract.shards import encode_shard
from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from coordinator.store import Store, Version
from models import export, registry
from models.local import recalibrate_bn, state_arrays
from models.data import load_cifar10
from models.train import evaluate, save_checkpoint
from tests.helpers.tiny_cifar import tiny_cifar10, write_official_archive

DATA = tiny_cifar10(n_train=300, n_test=40)
IMAGES = DATA.test_x[:9]


def trained_like(name: str, seed: int) -> dict[str, np.ndarray]:
    """A model's state moved away from its init (weights jittered, batch-norm statistics made up),
    so eval-mode batch norm and every entry matter."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arrays = state_arrays(registry.build(name))
    for k, v in arrays.items():
        if k.endswith("running_mean"):
            arrays[k] = rng.normal(0, 0.3, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            arrays[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
        else:
            arrays[k] = (v + rng.normal(0, 0.01, v.shape) * (np.abs(v).mean() + 1e-3)).astype(np.float32)
    return arrays


def torch_logits(name: str, arrays, images=IMAGES, calibrate: np.ndarray | None = None) -> np.ndarray:
    model = export.build_model(name, arrays)
    if calibrate is not None:
        recipe = registry.get(name).recipe     # augmented as the model trains, as the coordinator does
        recalibrate_bn(model, torch.from_numpy(np.ascontiguousarray(calibrate)), crop_pad=recipe.crop_pad,
                       flip=recipe.flip)
    with torch.no_grad():
        return model(torch.from_numpy(images).float()).numpy()


def assert_same_predictions(got: np.ndarray, want: np.ndarray, what: str) -> float:
    diff = float(np.abs(got - want).max())
    print(f"{what}: max |logit difference| {diff:.2g} (max |logit| {np.abs(want).max():.3g})")
    assert got.shape == want.shape and got.dtype == np.float32
    assert diff <= 1e-4 * max(1.0, float(np.abs(want).max())), what
    assert (got.argmax(1) == want.argmax(1)).all(), what
    return diff


# ----------------------------------------------------------------------------- models.export
@pytest.mark.parametrize("name", ["cnn", "resnet_fast", "supermask_fc"])
def test_onnx_and_pt_give_the_torch_models_predictions(name, tmp_path):
    arrays = trained_like(name, seed=1)
    want = torch_logits(name, arrays)
    data, check_diff = export.to_onnx(name, arrays, {"version": 7})
    assert check_diff < 1e-3
    onnx_path = export.write_atomic(tmp_path / f"{name}.onnx", data)
    pt_path = export.write_atomic(tmp_path / f"{name}.pt", export.to_pt(name, arrays, {"version": 7}))

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])  # plain onnxruntime
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:], out.name, out.shape[1:]) == ("images", "tensor(uint8)", [3, 32, 32],
                                                                          "logits", [10])
    assert_same_predictions(session.run(None, {"images": IMAGES})[0], want, f"{name} onnx (plain session)")
    assert_same_predictions(session.run(None, {"images": IMAGES[:1]})[0], want[:1], f"{name} onnx, batch 1")

    for path in (onnx_path, pt_path):
        predictor = export.load_predictor(path)
        assert predictor.model == name
        assert_same_predictions(predictor(IMAGES), want, f"{name} {predictor.kind} via load_predictor")
        assert predictor(torch.from_numpy(IMAGES[:2])).shape == (2, 10)
    ckpt = torch.load(pt_path, weights_only=True)
    assert ckpt["model"] == ckpt["config"]["model"] == name and ckpt["config"]["version"] == 7
    meta = export.load_predictor(onnx_path).info
    assert meta["model"] == name and meta["version"] == "7" and json.loads(meta["classes"])[0] == "airplane"


def test_supermask_graph_carries_the_masked_weights_only(tmp_path):
    import onnx

    arrays = trained_like("supermask_conv", seed=2)
    data, _ = export.to_onnx("supermask_conv", arrays)
    graph = onnx.load_from_string(data).graph
    assert "TopK" not in {n.op_type for n in graph.node}
    assert not any("scores" in i.name for i in graph.initializer)
    got = export.load_predictor(export.write_atomic(tmp_path / "m.onnx", data))(IMAGES)
    assert_same_predictions(got, torch_logits("supermask_conv", arrays), "supermask_conv onnx")


def test_a_mismatching_graph_fails_the_export_loudly():
    arrays = trained_like("cnn", seed=3)
    data, _ = export.to_onnx("cnn", arrays)
    other = export.Pixels(export.build_model("cnn", trained_like("cnn", seed=4)))
    with pytest.raises(export.ExportError, match="does not compute what torch does"):
        export.check_onnx(data, other, "cnn")


def test_the_loader_reads_crowdtrain_trains_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = registry.build("resnet_fast").to(memory_format=torch.channels_last)
    save_checkpoint(tmp_path / "model.pt", model, {"model": "resnet_fast", "seed": 0}, {"test_acc": 0.1})
    predictor = export.load_predictor(tmp_path / "model.pt")
    assert predictor.model == "resnet_fast" and predictor.info["metrics"] == {"test_acc": 0.1}
    assert_same_predictions(predictor(IMAGES), torch_logits("resnet_fast", state_arrays(model)), "train's model.pt")


def test_bad_model_files_are_one_clear_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    torch.save({"model": "no_such_model", "state_dict": {}}, tmp_path / "alien.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    cases = {"missing.onnx": "no such file", "junk.pt": "not a readable torch checkpoint",
             "junk.onnx": "not a loadable ONNX model", "alien.pt": "does not fit model 'no_such_model'",
             "other.pt": "expected a crowdtrain checkpoint"}
    for name, words in cases.items():
        with pytest.raises(export.ModelFileError) as e:
            export.load_predictor(tmp_path / name)
        assert words in str(e.value) and name in str(e.value) and "\n" not in str(e.value)
    ok = export.write_atomic(tmp_path / "ok.pt", export.to_pt("cnn", trained_like("cnn", 0)))
    predictor = export.load_predictor(ok)
    with pytest.raises(ValueError, match="uint8"):
        predictor(IMAGES.astype(np.float32))


# ----------------------------------------------------------------------------- crowdtrain export
FP32 = get_codec("fp32")


def make_state(root, model: str, versions: dict[int, dict], evals: dict[int, float], pruned=(), finished=True):
    """A coordinator state directory written through Store: the job's shards, versions, evaluations."""
    store = Store(root)
    store.set_meta("identity", {"job": "cifar10", "model": model, "data_digest": DATA.digest})
    shards = [[store.put_blob(encode_shard(DATA.train_x[i:i + 64], DATA.train_y[i:i + 64])),
               len(DATA.train_y[i:i + 64])] for i in range(0, len(DATA.train_y), 64)]
    store.set_meta("shards", shards)
    for step, arrays in sorted(versions.items()):
        blob = store.put_blob(encode_delta(FP32, arrays))
        store.commit_version(Version(step, blob, 1000 * step, step, time.time()), [], None)
    for step in pruned:
        store.delete_blob(store.version(step).blob)
        store.mark_version_pruned(step)
    for step, acc in evals.items():
        store.add_eval(step, 1000 * step, float(step), acc, 1.5)
    store.set_meta("finished", finished)
    store.close()
    return root


def export_cli(*args) -> int:
    return crowdtrain.main(["export", *map(str, args)])


def test_export_cli_final_best_and_numbered_versions(tmp_path, capsys):
    versions = {s: trained_like("resnet_fast", seed=10 + s) for s in range(4)}
    state = make_state(tmp_path / "state", "resnet_fast", versions, evals={1: 0.30, 2: 0.55, 3: 0.41}, pruned=[1])
    before = sorted(p.name for p in state.rglob("*"))

    assert export_cli("--state", state, "--format", "onnx", "--out", tmp_path / "final.onnx") == 0
    out = capsys.readouterr().out
    assert "version 3 (final; 3,000 samples; test accuracy 41.00%)" in out and "max |logit difference|" in out
    assert "re-estimated on 300 training images" in out
    # the exported model is the version as the evaluator measured it: statistics re-estimated on the shards' images
    want = torch_logits("resnet_fast", versions[3], calibrate=DATA.train_x)
    assert_same_predictions(export.load_predictor(tmp_path / "final.onnx")(IMAGES), want, "export --state, final")
    raw = torch_logits("resnet_fast", versions[3])
    assert np.abs(raw - want).max() > 1e-3   # (the re-estimate does change something here)

    assert export_cli("--state", state, "--version", "best", "--out", tmp_path / "best.pt") == 0   # format from suffix
    assert "version 2 (best evaluated" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["model"] == "resnet_fast" and ckpt["config"]["version"] == 2 and ckpt["metrics"]["test_acc"] == 0.55
    assert_same_predictions(export.load_predictor(tmp_path / "best.pt")(IMAGES),
                            torch_logits("resnet_fast", versions[2], calibrate=DATA.train_x), "export best .pt")

    assert export_cli("--state", state, "--version", "0", "--format", "pt", "--no-recalibrate",
                      "--out", tmp_path / "v0.pt") == 0
    capsys.readouterr()
    assert_same_predictions(export.load_predictor(tmp_path / "v0.pt")(IMAGES), torch_logits("resnet_fast", versions[0]),
                            "export --no-recalibrate")

    assert export_cli("--state", state, "--version", "1", "--out", tmp_path / "v1.onnx") == 2
    assert "version 1: pruned" in capsys.readouterr().err
    assert export_cli("--state", state, "--version", "9") == 2
    assert "version 9: no such version (the latest is 3)" in capsys.readouterr().err
    assert export_cli("--state", state, "--version", "newest") == 2
    assert "version: expected a version number, 'final' or 'best', got 'newest'" in capsys.readouterr().err
    assert export_cli("--state", tmp_path / "nowhere") == 2
    assert "not a coordinator state directory" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "v1.onnx").exists()
    assert sorted(p.name for p in state.rglob("*") if not p.name.startswith("state.db-")) == \
        [n for n in before if not n.startswith("state.db-")]   # the state is only read


def test_best_names_a_pruned_better_version(tmp_path, capsys):
    versions = {s: trained_like("cnn", seed=20 + s) for s in range(3)}
    state = make_state(tmp_path / "state", "cnn", versions, evals={1: 0.6, 2: 0.5}, pruned=[1], finished=False)
    assert export_cli("--state", state, "--version", "best", "--out", tmp_path / "m.pt") == 0
    out = capsys.readouterr().out
    assert "version 2 (best evaluated" in out
    assert "note: the best evaluated version, 1 (60.00%), was pruned; took the best one kept, version 2 (50.00%)" in out
    assert export_cli("--state", state, "--out", tmp_path / "m.pt") == 0
    assert "version 2 (latest; the job has not finished" in capsys.readouterr().out
    state2 = make_state(tmp_path / "state2", "cnn", versions, evals={}, finished=False)
    assert export_cli("--state", state2, "--version", "best") == 2
    assert "best: no version has been evaluated yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------- crowdtrain train / eval
def test_eval_prints_the_accuracy_train_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_CACHE", str(tmp_path / "cache"))
    archive = write_official_archive(tmp_path / "data", n_train=60, n_test=30)
    out = tmp_path / "run"
    assert crowdtrain.main(["train", "--model", "cnn", "--data", str(archive), "--epochs", "2", "--batch-size", "30",
                            "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"model: {out / 'model.pt'} (crowdtrain eval --model {out / 'model.pt'} --data {archive}")
    acc = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]   # models.train.evaluate

    assert crowdtrain.main(["eval", "--model", str(out / "model.pt"), "--data", str(archive), "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert f"(cnn, pt): test accuracy {100 * acc:.2f}% on 30 CIFAR-10 test images" in line

    assert export_cli("--model", out / "model.pt", "--format", "onnx") == 0
    assert f"wrote {out / 'model.onnx'}: cnn from {out / 'model.pt'}" in capsys.readouterr().out
    monkeypatch.setenv("CROWDTRAIN_DATA", str(archive))
    assert crowdtrain.main(["eval", "--model", str(out / "model.onnx"), "--limit", "30"]) == 0
    assert f"(cnn, onnx): test accuracy {100 * acc:.2f}% on 30 CIFAR-10" in capsys.readouterr().out

    # test-time augmentation (airbench's recipe has level 2; cnn's none): the same views as one process's last
    # evaluation, from the .pt and from the ONNX graph, with the plain accuracy beside
    _, module, _ = export.read_pt(out / "model.pt")
    data = load_cifar10(str(archive), progress=False)
    _, want, want_plain = evaluate(module, torch.from_numpy(data.test_x), torch.from_numpy(data.test_y), tta=2,
                                   with_plain=True)
    assert want_plain == acc
    for fmt in ("pt", "onnx"):
        assert crowdtrain.main(["eval", "--model", str(out / f"model.{fmt}"), "--tta", "2"]) == 0
        assert (f"(cnn, {fmt}): test accuracy {100 * want:.2f}% (test-time augmentation 2; without: "
                f"{100 * acc:.2f}%) on 30 CIFAR-10") in capsys.readouterr().out
    assert export.recipe_tta("airbench") == 2 and export.recipe_tta("cnn") == 0 and export.recipe_tta("nonet") == 0

    assert crowdtrain.main(["eval", "--model", str(tmp_path / "none.pt"), "--data", str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "none.pt: no such file" in err and len(err.splitlines()) == 1
    assert crowdtrain.main(["eval", "--model", str(out / "model.pt"), "--data", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nodata" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- GET /api/v1/model
async def test_http_model_download(aiohttp_client, tmp_path):
    cfg = CoordinatorConfig(state=tmp_path / "state", model="resnet_fast", shard_size=64, epochs=2.0,
                            eval_every_s=0.2)
    job = Job(cfg)
    job.open(DATA)
    client = await aiohttp_client(create_app(cfg, job))
    version = job.store.latest_version()
    arrays = decode_delta(job.store.get_blob(version.blob))

    resp = await client.get("/api/v1/model?format=onnx")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Disposition"] == f'attachment; filename="cifar10-resnet_fast-v{version.step}.onnx"'
    body = await resp.read()
    session = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    want = torch_logits("resnet_fast", arrays, calibrate=DATA.train_x)
    assert_same_predictions(session.run(["logits"], {"images": IMAGES})[0], want, "GET /api/v1/model onnx")
    again = await client.get(f"/api/v1/model?format=onnx&version={version.step}")
    assert again.status == 200 and await again.read() == body   # (from the cache)

    resp = await client.get("/api/v1/model?format=pt&version=final")
    assert resp.status == 200 and resp.headers["Content-Disposition"].endswith(f'-v{version.step}.pt"')
    (tmp_path / "m.pt").write_bytes(await resp.read())
    assert_same_predictions(export.load_predictor(tmp_path / "m.pt")(IMAGES), want, "GET /api/v1/model pt")

    for query, field in (("format=tflite", "format"), ("format=onnx&version=-1", "version"),
                         ("format=pt&version=latest", "version")):
        resp = await client.get(f"/api/v1/model?{query}")
        body = await resp.json()
        assert resp.status == 400 and body["error"]["field"] == field and body["error"]["code"] == "invalid", body
    resp = await client.get("/api/v1/model?format=onnx&version=99")
    body = await resp.json()
    assert resp.status == 404 and body["error"]["field"] == "version" and "no such version" in body["error"]["message"]

    # best: the version the evaluator scored, and the file scores what it recorded
    for _ in range(300):
        if job.store.evals():
            break
        await asyncio.sleep(0.1)
    recorded = job.store.evals()[0]
    resp = await client.get("/api/v1/model?format=onnx&version=best")
    assert resp.status == 200 and resp.headers["X-Crowdtrain-Version"] == str(recorded["version"])
    (tmp_path / "best.onnx").write_bytes(await resp.read())
    _, acc, _ = export.evaluate(export.load_predictor(tmp_path / "best.onnx"), DATA.test_x, DATA.test_y)
    model = export.build_model("resnet_fast", arrays)
    recipe = registry.get("resnet_fast").recipe
    recalibrate_bn(model, torch.from_numpy(DATA.train_x), crop_pad=recipe.crop_pad, flip=recipe.flip)
    assert abs(acc - evaluate(model, torch.from_numpy(DATA.test_x), torch.from_numpy(DATA.test_y))[1]) < 1e-9
    assert abs(acc - recorded["test_acc"]) <= 1 / len(DATA.test_y)   # (a near-tie may fall either way)


def test_run_writes_the_final_model_files(tmp_path, capsys):
    """``crowdtrain run`` ends by writing STATE/model.pt and STATE/model.onnx and saying where they are."""
    from coordinator.run import write_models

    versions = {0: trained_like("cnn", seed=1), 1: trained_like("cnn", seed=2)}
    state = make_state(tmp_path / "state", "cnn", versions, evals={1: 0.3})
    write_models(state)
    out = capsys.readouterr().out
    assert f"model: {state / 'model.pt'}" in out and f"model: {state / 'model.onnx'}" in out
    want = torch_logits("cnn", versions[1])
    for fmt in ("pt", "onnx"):
        assert_same_predictions(export.load_predictor(state / f"model.{fmt}")(IMAGES), want, f"run's model.{fmt}")


async def test_versions_not_yet_persisted_still_come_out(aiohttp_client, tmp_path, capsys):
    """Versions are written on a policy, not each one: a live job's final version, and an evaluated one
    (it can be the best), are written on demand; a dead job's state falls back to the newest written."""
    from tests.helpers.fault_worker import body, compute
    from tests.helpers.protocol import fetch_all, post, start_job, take

    client, job = await start_job(aiohttp_client, tmp_path, persist_every_s=1e6, persist_every_versions=10 ** 6)
    for _ in range(2):
        unit = await take(client, "w1")
        status, got = await post(client, unit, body(compute(unit, await fetch_all(client, unit), "w1")))
        assert status == 200 and got["accepted"], got
    await job.settle()
    assert job.step == 2 and not job.store.version(2).blob   # folded, not persisted
    job.store.set_version_blob(1, "")                        # (as if no unit had been cut from it either)

    resp = await client.get("/api/v1/model?format=pt&version=final")
    assert resp.status == 200 and resp.headers["X-Crowdtrain-Version"] == "2", await resp.text()
    assert job.store.version(2).blob and decode_delta(job.store.get_blob(job.store.version(2).blob)).keys() == \
        job.state.keys()

    state_dir = job.config.state
    job.record_eval(job.evaluate_current())                  # version 2 is evaluated: it stays written
    assert job.store.evals()[-1]["version"] == 2 and job.store.version(2).blob
    job.close()
    store = Store(state_dir)
    store.set_version_blob(2, "")                            # as if killed before writing version 2
    store.close()
    assert export_cli("--state", state_dir, "--format", "pt", "--out", tmp_path / "m.pt") == 0
    out = capsys.readouterr().out
    assert "version 0" in out and "version 2, the newest, was not written" in out and "took version 0" in out

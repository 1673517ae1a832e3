"""Credit and the leaderboard (coordinator/credit.py; issue 13 item 4) and what a tab downloads (item 6).

Inside a real job behind the real app (pytest-aiohttp on 127.0.0.1, a real SQLite store, tiny
data; tests/helpers/protocol.py), with honest and lying workers from tests/helpers/fault_worker.py:
only folded, never-dropped work earns credit (stale-dropped, quarantined, distrusted and
superseded results earn nothing); ranks are competition ranks (ties share one); a worker sees
its own rank; the ranking is cached; display names are checked as the contract says (the same
golden file as the JavaScript contract), escaped on the page, rate limited, kept across a
restart; worker ids are never published; ``crowdtrain worker --name`` sets one.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path

from contract.errors import ContractError
from contract.names import NAME_MAX_CHARS, NameRequest
from contract.units import WORKER_KEY_HEADER
from coordinator.credit import BOARD, CreditBoard, rank
from tests.helpers.fault_worker import Fault, body, compute
from tests.helpers.protocol import fetch_all, key_of, post, start_job, take, trusted_by_now

GOLDEN = Path(__file__).resolve().parent / "golden"


def folded_samples(job) -> dict[str, int]:
    """The ledger's truth: per worker, samples of results folded and never dropped."""
    out = defaultdict(int)
    for r in job.store.results():
        if r["applied_step"] is not None and r["dropped"] is None:
            out[r["worker_id"]] += r["num_samples"]
    return dict(out)


async def credit(client, worker: str | None = None, **query) -> dict:
    params = {**({"worker": worker} if worker else {}), **{k: str(v) for k, v in query.items()}}
    resp = await client.get("/api/v1/credit", params=params)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def honest(client, unit, worker, fault=Fault.NONE):
    status, answer = await post(client, unit, body(compute(unit, await fetch_all(client, unit), worker), fault))
    assert status == 200 and answer["accepted"], answer
    return answer


def fresh(client) -> CreditBoard:
    """The app's board, with its cache off (tests of the cache set it themselves)."""
    board = client.server.app[BOARD]
    board.cache_s = 0.0
    return board


# --- ranking --------------------------------------------------------------------------------------

def test_equal_samples_share_a_rank_and_the_next_rank_skips():
    rows = [{"w": "a", "samples": 50}, {"w": "b", "samples": 100}, {"w": "c", "samples": 50},
            {"w": "d", "samples": 10}, {"w": "e", "samples": 100}]
    ranked = rank(rows)
    assert [r["samples"] for r in ranked] == [100, 100, 50, 50, 10]
    assert [r["rank"] for r in ranked] == [1, 1, 3, 3, 5]
    assert {r["w"] for r in ranked} == set("abcde") and rank([]) == []


# --- only folded work counts ---------------------------------------------------------------------

async def test_a_stale_dropped_result_earns_nothing(aiohttp_client, tmp_path):
    """Two units cut from version 0; the first result folds, the second arrives stale past
    --max-staleness 0 and the aggregator drops it: its worker earns only for its next, fresh unit."""
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd",
                                  strategy_params={"staleness": "constant"}, robust="none",
                                  on_stale="drop", max_staleness=0)
    fresh(client)
    first, late = await take(client, "w1"), await take(client, "w2")
    await honest(client, first, "w1")
    await job.settle()
    await honest(client, late, "w2")
    await job.settle()
    fates = {r["unit_id"]: r for r in job.store.results()}
    assert fates[late.unit_id]["dropped"] == "stale", fates[late.unit_id]
    seen = await credit(client, "w2")
    assert seen["me"]["rank"] is None and seen["me"]["samples"] == 0 and seen["totals"]["workers"] == 1
    assert seen["ranked"][0]["samples"] == first.local_steps * first.batch_size == folded_samples(job)["w1"]

    again = await take(client, "w2")
    await honest(client, again, "w2")
    await job.settle()
    seen = await credit(client, "w2")
    truth = folded_samples(job)
    assert seen["me"]["samples"] == truth["w2"] == again.local_steps * again.batch_size, "only the fresh unit"
    assert seen["me"]["units"] == 1 and seen["totals"]["samples"] == sum(truth.values()) == job.store.latest_version().samples


async def test_a_quarantined_liar_earns_nothing(aiohttp_client, tmp_path):
    """With replication, a sign-flipping worker loses its checks (dropped as distrusted), is
    quarantined (dropped as quarantined) and never appears on the ranking; the honest ones do."""
    client, job = await start_job(aiohttp_client, tmp_path, epochs=20.0, strategy="async_sgd",
                                  strategy_params={"staleness": "constant"}, robust="none", replication="adaptive")
    fresh(client)
    held = {w: await take(client, w) for w in ("liar", "h1", "h2")}
    for _ in range(5):
        for worker in ("liar", "h1", "h2"):
            await honest(client, held[worker], worker, Fault.SIGN_FLIP if worker == "liar" else Fault.NONE)
            await job.settle()
            held[worker] = await take(client, worker)
    for _ in range(2):
        await job.settle()
    reasons = Counter(r["dropped"] for r in job.store.results() if r["worker_id"] == "liar")
    assert reasons["distrusted"] >= 2 and reasons["quarantined"] >= 1, reasons
    seen = await credit(client, "liar")
    assert seen["me"] == {**seen["me"], "rank": None, "samples": 0, "units": 0}
    truth = folded_samples(job)
    assert "liar" not in truth and truth["h1"] > 0 and truth["h2"] > 0
    assert sorted(r["samples"] for r in seen["ranked"]) == sorted(truth.values())
    assert seen["totals"] == {"workers": 2, "samples": sum(truth.values()),
                              "units": sum(1 for r in job.store.results()
                                           if r["applied_step"] is not None and r["dropped"] is None)}


async def test_a_liar_quarantined_after_lies_were_folded_keeps_no_credit(aiohttp_client, tmp_path):
    """A worker that earned trust, then lies: its first lie is used unchecked and folded (it counted as credit),
    its next two are checked and lose. Quarantined, it leaves the ranking altogether and its record's credit is
    0: the lie folded before it was found out buys it nothing."""
    client, job = await start_job(aiohttp_client, tmp_path, epochs=20.0, strategy="async_sgd",
                                  strategy_params={"staleness": "constant"}, robust="none", replication="adaptive")
    for worker in ("turncoat", "h1"):   # (h1 trusted so that no unit of its own is replicated to the turncoat)
        trusted_by_now(job, worker)
    await take(client, "h1")
    job._draw = lambda: 1.0
    await honest(client, await take(client, "turncoat"), "turncoat", Fault.SIGN_FLIP)
    await job.settle()
    assert folded_samples(job).get("turncoat", 0) > 0 and (await credit(client, "turncoat"))["me"]["samples"] > 0
    job._draw = lambda: 0.0
    for _ in range(2):
        lie = await take(client, "turncoat")
        await honest(client, lie, "turncoat", Fault.SIGN_FLIP)
        await honest(client, await take(client, "h1"), "h1")   # the replica of the lie
        await job.settle()
    assert job.trust.get("turncoat").quarantined and job.trust.get("turncoat").credit == 0
    fresh(client)
    seen = await credit(client, "turncoat")
    assert seen["me"]["rank"] is None and seen["me"]["samples"] == 0
    assert seen["totals"]["workers"] == len([w for w in folded_samples(job) if w != "turncoat"])


async def test_a_superseded_tail_copy_earns_nothing(aiohttp_client, tmp_path):
    """Once the budget is out, an idle worker gets a copy of a slow worker's unit; the copy that
    comes first is folded, the other is superseded and earns nothing."""
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd", epochs=1.0)
    fresh(client)
    slow = [await take(client, "slow") for _ in range(4)]
    assert all(slow) and await take(client, "slow") is None
    copy = await take(client, "idle")
    assert copy is not None and copy.shard_ids == slow[0].shard_ids
    await honest(client, copy, "idle")
    await job.settle()
    status, _ = await post(client, slow[0], body(compute(slow[0], await fetch_all(client, slow[0]), "slow")))
    await job.settle()
    fates = {r["unit_id"]: r for r in job.store.results()}
    assert fates[copy.unit_id]["applied_step"] is not None
    assert slow[0].unit_id not in fates or fates[slow[0].unit_id]["applied_step"] is None, (status, fates)
    seen = await credit(client, "slow")
    assert seen["me"]["samples"] == 0 and seen["me"]["rank"] is None
    assert [(r["rank"], r["samples"]) for r in seen["ranked"]] == [(1, folded_samples(job)["idle"])]


# --- ranks, own rank, no worker ids, the cache -------------------------------------------------------

async def test_ranks_ties_and_own_rank_over_http(aiohttp_client, tmp_path):
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd",
                                  strategy_params={"staleness": "constant"})
    fresh(client)
    for worker, units in (("web-aaaaaaaaaaaaaaaa", 2), ("py-bbbbbbbbbbbbbbbb", 1), ("py-cccccccccccccccc", 1)):
        for _ in range(units):
            await honest(client, await take(client, worker), worker)
            await job.settle()
    per_unit = folded_samples(job)["py-bbbbbbbbbbbbbbbb"]
    seen = await credit(client)
    assert [(r["rank"], r["samples"], r["units"]) for r in seen["ranked"]] == \
        [(1, 2 * per_unit, 2), (2, per_unit, 1), (2, per_unit, 1)]
    assert seen["totals"] == {"workers": 3, "samples": 4 * per_unit, "units": 4} and "me" not in seen
    text = json.dumps(seen)
    assert "aaaaaaaa" not in text and "bbbbbbbb" not in text and "cccccccc" not in text, "worker ids are never published"
    assert len({r["tag"] for r in seen["ranked"]}) == 3 and all(r["name"] is None for r in seen["ranked"])

    me = (await credit(client, "py-cccccccccccccccc"))["me"]
    assert (me["rank"], me["samples"], me["units"], me["of"]) == (2, per_unit, 1, 3)
    assert me["tag"] in {r["tag"] for r in seen["ranked"] if r["rank"] == 2}, "a worker finds its own row by its tag"
    assert (await credit(client, "web-aaaaaaaaaaaaaaaa"))["me"]["rank"] == 1
    nobody = (await credit(client, "never-seen"))["me"]
    assert (nobody["rank"], nobody["samples"], nobody["of"]) == (None, 0, 3)
    assert [r["rank"] for r in (await credit(client, limit=1))["ranked"]] == [1]
    for query, field in (({"worker": "a b"}, "worker"), ({"worker": "x" * 129}, "worker"), ({"limit": "0"}, "limit"),
                         ({"limit": "1001"}, "limit"), ({"limit": "-1"}, "limit"), ({"limit": "ten"}, "limit")):
        resp = await client.get("/api/v1/credit", params=query)
        got = await resp.json()
        assert resp.status == 400 and got["error"]["field"] == field and "expected" in got["error"]["message"], got


async def test_the_ranking_is_cached_a_few_seconds(aiohttp_client, tmp_path):
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    board = client.server.app[BOARD]
    now = [1000.0]
    board.monotonic = lambda: now[0]
    assert board.cache_s == 5.0
    assert (await credit(client))["totals"]["workers"] == 0
    await honest(client, await take(client, "w1"), "w1")
    await job.settle()
    assert folded_samples(job)["w1"] > 0
    asked = board.queries
    answers = await asyncio.gather(*(credit(client, f"tab-{i}") for i in range(200)))
    assert board.queries == asked, "200 polls within the window cost no query"
    assert all(a["totals"]["workers"] == 0 for a in answers), "served from the cached ranking"
    now[0] += 5.0
    assert (await credit(client, "w1"))["me"]["samples"] == folded_samples(job)["w1"]
    assert board.queries == asked + 1


# --- display names -----------------------------------------------------------------------------------

def test_name_rule_matches_the_golden_file():
    """The same file worker_web/test/contract.test.mjs checks contract.js against."""
    golden = json.loads((GOLDEN / "names.json").read_text())
    assert golden["max_chars"] == NAME_MAX_CHARS
    accepted = 0
    for case in golden["cases"]:
        try:
            got = NameRequest.from_json(case["body"])
        except ContractError as e:
            assert "field" in case and (e.field, e.code) == (case["field"], case["code"]), (case, e)
            continue
        assert "name" in case and got.name == case["name"], case
        accepted += 1
    assert 0 < accepted < len(golden["cases"])


async def set_name(client, worker, payload, **headers):
    """``POST /api/v1/workers/<worker>/name`` with the key ``take`` sent for it (unless ``headers`` name one)."""
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    resp = await client.post(f"/api/v1/workers/{worker}/name", data=data, headers={
        "Content-Type": "application/json", WORKER_KEY_HEADER: key_of(worker), **headers})
    return resp.status, await resp.json()


async def test_names_are_checked_shown_escaped_and_kept(aiohttp_client, tmp_path):
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    fresh(client)
    for worker in ("w-evil", "w-ada"):
        await honest(client, await take(client, worker), worker)
        await job.settle()
    evil = "<script>alert(1)</script>"
    status, answer = await set_name(client, "w-evil", {"protocol": 1, "name": evil})
    assert status == 200 and answer["name"] == evil and answer["tag"].startswith("anon-")
    assert (await set_name(client, "w-ada", {"protocol": 1, "name": "Ada & Co"}))[0] == 200

    page = await client.get("/leaderboard")
    html = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html, "the name is escaped"
    assert "Ada &amp; Co" in html and answer["tag"] in html and "w-evil" not in html and "w-ada" not in html
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    seen = await credit(client, "w-evil")
    assert seen["me"]["name"] == evil and {r["name"] for r in seen["ranked"]} == {evil, "Ada & Co"}

    bad = [({"protocol": 1, "name": ""}, "name_request.name"), ({"protocol": 1, "name": "x" * 33}, "name_request.name"),
           ({"protocol": 1, "name": "a\u202eb"}, "name_request.name"), ({"protocol": 1, "name": " Ada"}, "name_request.name"),
           ({"protocol": 1, "name": "Ada\n"}, "name_request.name"), ({"protocol": 1, "name": 5}, "name_request.name"),
           ({"protocol": 1}, "name_request.name"), ({"protocol": 1, "name": "A", "x": 1}, "name_request.x"),
           ({"protocol": 2, "name": "A"}, "name_request.protocol"), ("not json", "name_request"),
           ('{"protocol": 1, "name": "A", "name": "B"}', "name_request"), (b"\xff\xfe", "name_request"),
           ([1], "name_request")]
    for payload, field in bad:
        status, got = await set_name(client, "w-ada", payload)
        assert 400 <= status < 500 and got["error"]["field"] == field, (payload, status, got)
        assert "expected" in got["error"]["message"], got
    status, got = await set_name(client, "w%20ada", {"protocol": 1, "name": "A"})
    assert status == 400 and got["error"]["field"] == "worker_id", got
    status, got = await set_name(client, "w-ada", "x" * 70_000)
    assert status == 413 and got["error"]["field"] == "body", got
    assert (await credit(client, "w-ada"))["me"]["name"] == "Ada & Co", "refused requests change nothing"

    ada_tag = (await credit(client, "w-ada"))["me"]["tag"]
    assert await set_name(client, "w-ada", {"protocol": 1, "name": None}) == (200, {"name": None, "tag": ada_tag})
    assert (await credit(client, "w-ada"))["me"]["name"] is None
    assert "anonymous" in await (await client.get("/leaderboard")).text()


async def test_names_survive_a_restart(aiohttp_client, tmp_path):
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    assert (await set_name(client, "tab-1", {"protocol": 1, "name": "Grace"}))[0] == 200
    tag = (await credit(client, "tab-1"))["me"]["tag"]
    await client.close()
    again, _ = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    me = (await credit(again, "tab-1"))["me"]
    assert (me["name"], me["tag"]) == ("Grace", tag), "names and tags are kept with the job's state"
    assert (await credit(again, "tab-2"))["me"]["tag"] != tag


async def test_name_changes_are_rate_limited_per_address(aiohttp_client, tmp_path):
    client, _ = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    remote = {"X-Forwarded-For": "203.0.113.9"}   # from this machine: a local proxy's client
    statuses = [(await set_name(client, f"minted-{i}", {"protocol": 1, "name": "spam"}, **remote))[0] for i in range(8)]
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429, statuses
    status, got = await set_name(client, "minted-x", {"protocol": 1, "name": "spam"}, **remote)
    assert status == 429 and got["error"]["code"] == "rate_limited"
    assert (await set_name(client, "local", {"protocol": 1, "name": "ok"}))[0] == 200, "loopback is not limited"


async def test_names_need_a_worker_token_in_a_closed_deployment(aiohttp_client, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("lab-token-0123456789\n")
    client, _ = await start_job(aiohttp_client, tmp_path, strategy="async_sgd", worker_tokens=str(tokens))
    status, got = await set_name(client, "w1", {"protocol": 1, "name": "A"})
    assert status == 401 and got["error"]["field"] == "Authorization"
    status, _ = await set_name(client, "w1", {"protocol": 1, "name": "A"}, Authorization="Bearer lab-token-0123456789")
    assert status == 200


async def test_the_worker_sets_its_name_with_the_flag(aiohttp_client, tmp_path):
    from worker_py.main import cli

    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    url = str(client.make_url("")).rstrip("/")
    assert cli(["--coordinator", url, "--name", "x" * 33]) == 2, "a bad name is refused before anything runs"
    code = await asyncio.to_thread(cli, ["--coordinator", url, "--worker-id", "py-named", "--name", "Hopper's box",
                                         "--max-units", "1", "--threads", "1", "--no-progress",
                                         "--cache", str(tmp_path / "cache")])
    assert code == 0
    await job.settle()
    me = (await credit(client, "py-named"))["me"]
    assert me["name"] == "Hopper's box" and me["samples"] == folded_samples(job)["py-named"] > 0


# --- pages -------------------------------------------------------------------------------------------

async def test_what_a_tab_downloads_comes_from_the_job(aiohttp_client, tmp_path):
    client, job = await start_job(aiohttp_client, tmp_path, strategy="async_sgd")
    resp = await client.get("/api/v1/donate")
    info = await resp.json()
    assert resp.status == 200 and info["model"] == "cnn"
    version = job.store.latest_version()
    unit = info["per_unit"]
    assert unit["model_version_bytes"] == job.store.blob_path(version.blob).stat().st_size > 100_000
    issued = await take(client, "w1")
    shard = job.store.blob_path(issued.shard_ids[0]).stat().st_size
    assert unit["shard_bytes"] == shard and unit["shards"] == len(issued.shard_ids)
    assert unit["samples"] == issued.local_steps * issued.batch_size and unit["batch_size"] == issued.batch_size
    first = info["tab_units"]["first"]   # a tab's first unit: one step on a slice, the model as fp16
    assert info["tab_units"]["seconds"] == job.config.unit_seconds and first["samples"] == job.recipe.batch_size
    assert first["model_version_bytes"] == unit["model_version_bytes"] // 2 and 0 < first["shard_bytes"] <= shard
    assert info["once"]["step_graph"]["state"] == "not built yet", "asking does not start an export"
    assert info["once"]["page_bytes"] > 0
    for path in ("/", "/dashboard"):
        assert 'href="/leaderboard"' in await (await client.get(path)).text(), path


# --- hostile input on the new routes: a 4xx naming the problem, never a 5xx ------------------------------

from hypothesis import given, strategies as st  # noqa: E402

from tests.test_hostile import HOSTILE, app_client, check, headers, json_bodies, path_part  # noqa: E402,F401

name_bodies = st.one_of(json_bodies, st.builds(lambda v: json.dumps({"protocol": 1, "name": v}).encode(),
                                               st.one_of(st.text(max_size=50), st.integers(), st.none())))


@HOSTILE
@given(worker=path_part, data=name_bodies, extra=headers)
async def test_hostile_names(app_client, worker, data, extra):
    client, _ = app_client
    if not worker:
        return
    resp = await client.post(f"/api/v1/workers/{worker}/name", data=data, headers=extra)
    await check(resp, (worker[:40], data[:80]))
    if resp.status >= 400 and resp.status not in (404, 405):   # "." or ".." segments: another route, or none
        assert (await resp.json())["error"]["field"], "the error names a field"


@HOSTILE
@given(query=st.dictionaries(st.sampled_from(["worker", "limit", "x"]), st.text(max_size=300), max_size=3),
       extra=headers)
async def test_hostile_credit_and_pages(app_client, query, extra):
    client, _ = app_client
    await check(await client.get("/api/v1/credit", params=query, headers=extra), query)
    for path in ("/leaderboard", "/api/v1/donate"):
        resp = await client.get(path, params=query, headers=extra)
        assert resp.status == 200, (path, resp.status)

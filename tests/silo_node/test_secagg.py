"""The silo's side of secure aggregation: its helper pin, and each round's decision.

The pure rules (:mod:`silo_node.secagg`) are tested directly; the daemon runs in-process
against :class:`FakeCoordinator` (real keys, signatures, HPKE; the release carries the
signed ``secure_aggregation`` member) with real Opacus training; ``helper-enrol`` talks
to a real ``fedsilo-helper serve`` process over loopback HTTP.
"""

from __future__ import annotations

import json
import random
import sqlite3

import httpx
import pytest
import torch

from privacy import secagg
from privacy.keys import Identity, b64e
from privacy.masked_update import open_seed
from silo_node.cli import main as silo_main
from silo_node.client_errors import Untrusted
from silo_node.commands import helper_enrol, init_silo, run_silo, silo_status
from silo_node.config import ConfigError, SiloConfig
from silo_node.daemon import Outcome
from silo_node.ledger import Ledger
from silo_node.secagg import HelperPin, SecaggError, SecaggReason, masking_for, pin_helper
from tests.support.fake_coordinator import FakeCoordinator
from tests.support.helper import running_helper

from .test_daemon import FAST, enrol, real_now

MASK = {"clip": 1.0, "scale": 65536, "max_updates": 64, "max_weight": 256}


def setting_for(helper_keys: dict, **changes) -> dict:
    """The coordinator-signed ``secure_aggregation`` object for a helper with these keys."""
    return {"mode": "helper", "helper_url": "http://127.0.0.1:1", "helper_signing_key": helper_keys["signing_key"],
            "helper_hpke_key": helper_keys["hpke_key"], "k_min": 2, "mask": dict(MASK), **changes}


def pin_file(config: SiloConfig, helper: Identity, url: str = "https://helper.example") -> HelperPin:
    """Pin ``helper`` in silo.toml as `helper-enrol` would (the HTTP exchange is tested below)."""
    pin = HelperPin(url, **helper.public().to_json())
    config.with_(helper=pin).save()
    return pin


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator(clock=real_now)


@pytest.fixture
def helper() -> Identity:
    return Identity.generate()


def run(config: SiloConfig, fake: FakeCoordinator, *, rounds: int = 1, overrides: dict | None = None, **options):
    options.setdefault("rng", random.Random(0))
    options.setdefault("transport", fake.transport)
    return run_silo(config.data_dir, rounds=rounds, overrides={**FAST, **(overrides or {})}, environ={}, **options)


# --------------------------------------------------------------------------- the rules


def test_off_means_plain_and_on_means_the_pinned_helper_key(helper):
    pin = HelperPin("https://h.example", **helper.public().to_json())
    assert masking_for(None, pin, compression="int8") is None  # off: nothing changes, compression included
    plan = masking_for(setting_for(helper.public().to_json()), pin, compression="none")
    assert plan.helper_fingerprint == helper.public().fingerprints()["hpke"]
    assert plan.settings == secagg.MaskSettings(**MASK)


@pytest.mark.parametrize(("setting", "pinned", "compression", "reason", "words"), [
    ("ours", False, "none", SecaggReason.NOT_ENROLLED, "helper-enrol"),
    ("other", True, "none", SecaggReason.KEY_MISMATCH, "not the keys this silo pinned"),
    ("ours", True, "int8", SecaggReason.COMPRESSION, "do not compose"),
    ("ours", True, "topk", SecaggReason.COMPRESSION, 'compression = "none"'),
    ("wrap", True, "none", SecaggReason.BAD_SETTING, "could wrap"),
    ("mode", True, "none", SecaggReason.BAD_SETTING, "not one this silo knows"),
])
def test_a_round_that_cannot_be_masked_is_refused_never_sent_plain(helper, setting, pinned, compression, reason,
                                                                   words):
    keys = helper.public().to_json()
    value = {
        "ours": setting_for(keys),
        "other": setting_for(Identity.generate().public().to_json()),
        "wrap": setting_for(keys, mask={**MASK, "max_updates": 1024}),
        "mode": setting_for(keys, mode="lightsecagg"),
    }[setting]
    pin = HelperPin("https://h.example", **keys) if pinned else None
    with pytest.raises(SecaggError) as info:
        masking_for(value, pin, compression=compression)
    assert info.value.reason is reason and words in info.value.message


def test_the_helper_answer_must_name_this_silo_and_match_what_the_coordinator_signed(helper):
    keys = helper.public().to_json()
    answer = {"silo_id": "s1", "helper_keys": keys, "helper_fingerprints": helper.public().fingerprints()}
    assert pin_helper(answer, url="https://h", silo_id="s1").hpke_key == keys["hpke_key"]
    assert pin_helper(answer, url="https://h", silo_id="s1", signed_setting=setting_for(keys)).signing_key
    for bad, reason in (
        ({**answer, "silo_id": "s2"}, SecaggReason.BAD_ANSWER),
        ({**answer, "helper_fingerprints": {"signing": "x", "hpke": "y"}}, SecaggReason.BAD_ANSWER),
        ({"silo_id": "s1"}, SecaggReason.BAD_ANSWER),
    ):
        with pytest.raises(SecaggError) as info:
            pin_helper(bad, url="https://h", silo_id="s1")
        assert info.value.reason is reason
    other = setting_for(Identity.generate().public().to_json())
    with pytest.raises(SecaggError) as info:
        pin_helper(answer, url="https://h", silo_id="s1", signed_setting=other)
    assert info.value.reason is SecaggReason.KEY_MISMATCH
    with pytest.raises(SecaggError) as info:
        pin_helper(answer, url="https://h", silo_id="s1",
                   expected_fingerprint=Identity.generate().public().fingerprints()["signing"])
    assert info.value.reason is SecaggReason.KEY_MISMATCH


def test_a_hand_edited_helper_key_is_refused_at_load(tmp_path, fake, helper):
    config = enrol(tmp_path, fake)
    pin_file(config, helper)
    path = config.data_dir / "silo.toml"
    text = path.read_text()
    other = Identity.generate().public().to_json()["hpke_key"]
    path.write_text(text.replace(helper.public().to_json()["hpke_key"], other, 1))
    with pytest.raises(ConfigError) as info:
        SiloConfig.load(config.data_dir, environ={})
    assert "helper keys do not match the fingerprints" in info.value.message


# --------------------------------------------------------------------------- the daemon


def test_a_silo_sends_shares_when_the_signed_release_says_helper(tmp_path, fake, helper):
    config = enrol(tmp_path, fake)
    pin_file(config, helper)
    fake.secure_aggregation = setting_for(helper.public().to_json())
    result = run(config, fake, rounds=2)
    assert (result.outcome, result.receipts) == (Outcome.ROUNDS_DONE, 2)
    assert fake.version == 0 and len(fake.masked) == 2  # buffered in shares, nothing folded in the clear

    settings = secagg.MaskSettings(**MASK)
    shapes = {spec.name: spec.shape for spec in fake.schema.tensors}
    for header, statement, shares in fake.masked:
        assert header.payload_kind == "masked_delta"
        assert statement.helper_key == helper.public().fingerprints()["hpke"]
        assert statement.federation == fake.federation and statement.update_id == header.update_id
        # Only the helper's key opens the seed; with it, share + mask is the silo's clipped,
        # quantized delta: finite, within the clip, and not the share itself.
        seed = open_seed(statement, helper.hpke)
        opened = secagg.open_sum(shares, secagg.mask_sum([(seed, header.update_id, 1)], shapes), settings.scale)
        values = [float(v) for t in opened.values() for v in t.flatten()]
        assert max(abs(v) for v in values) <= settings.clip and any(v != 0 for v in values)
        quantized = {n: o.mul(settings.scale).round().long() % 2**32 for n, o in opened.items()}
        assert all(not torch.equal(shares[n], quantized[n]) for n in shares)  # the share is not the update

    with Ledger(config.ledger_path, readonly=True) as ledger:
        rows = ledger.entries("update")
    assert [(r.status, r.payload_kind, r.helper_key) for r in rows] == \
        [("buffered", "masked_delta", helper.public().fingerprints()["hpke"])] * 2
    status = silo_status(config.data_dir, environ={})
    assert status["updates_in_shares"] == 2 and status["last_helper_key"] == helper.public().fingerprints()["hpke"]
    assert status["helper"]["fingerprints"] == helper.public().fingerprints()


def test_plain_rounds_record_their_payload_kind(tmp_path, fake):
    config = enrol(tmp_path, fake)
    assert run(config, fake).outcome is Outcome.ROUNDS_DONE
    with Ledger(config.ledger_path, readonly=True) as ledger:
        (row,) = ledger.entries("update")
    assert (row.status, row.payload_kind, row.helper_key) == ("accepted", "delta", None)


def test_not_enrolled_with_the_helper_waits_without_training_and_resumes_once_enrolled(tmp_path, fake, helper):
    config = enrol(tmp_path, fake)
    fake.secure_aggregation = setting_for(helper.public().to_json())
    phases: list[str] = []
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 2:  # the operator runs `fedsilo-silo helper-enrol` while the daemon waits
            pin_file(config, helper)
        return False

    result = run(config, fake, wait=wait, on_phase=lambda name, info: phases.append(name))
    assert result.outcome is Outcome.ROUNDS_DONE and len(fake.masked) == 1
    assert phases.count("waiting for the helper enrolment") == 2
    assert phases.count("training") == 1  # nothing was trained (or spent) while it could not be sent
    assert all(w >= 10 for w in waits[:2])
    with Ledger(config.ledger_path, readonly=True) as ledger:
        assert [r.payload_kind for r in ledger.entries("update")] == ["masked_delta"]


def test_other_helper_keys_in_the_signed_release_stop_the_silo_with_exit_3(tmp_path, fake, helper):
    config = enrol(tmp_path, fake)
    pin_file(config, helper)
    fake.secure_aggregation = setting_for(Identity.generate().public().to_json())
    result = run(config, fake)
    assert (result.outcome, result.exit_code) == (Outcome.REFUSED, 3)
    assert "not the keys this silo pinned" in result.message
    with Ledger(config.ledger_path, readonly=True) as ledger:
        assert ledger.entries("update") == []
        assert ledger.summary().last_stop.reason == "helper_key_mismatch"


def test_compression_with_secure_aggregation_stops_with_a_clear_message(tmp_path, fake, helper):
    config = enrol(tmp_path, fake)
    pin_file(config, helper)
    fake.secure_aggregation = setting_for(helper.public().to_json())
    result = run(config, fake, overrides={"compression": "int8"})
    assert (result.outcome, result.exit_code) == (Outcome.FATAL, 1)
    assert "do not compose" in result.message and fake.masked == []


def test_a_plain_update_refused_as_masking_required_is_followed_by_a_masked_one(tmp_path, fake, helper):
    config = enrol(tmp_path, fake)
    pin_file(config, helper)
    # The release the silo trained from said off; the federation turned it on before the push.
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/updates":
            fake.secure_aggregation = setting_for(helper.public().to_json())
        return fake.handle(request)

    result = run(config, fake, rounds=1, transport=httpx.MockTransport(handle))
    assert result.outcome is Outcome.ROUNDS_DONE
    with Ledger(config.ledger_path, readonly=True) as ledger:
        rows = ledger.entries("update")
    assert [(r.payload_kind, r.status, r.reason) for r in rows][-1] == ("masked_delta", "buffered", None)
    assert ("delta", "rejected", "masking_required") in [(r.payload_kind, r.status, r.reason) for r in rows]


def test_a_schema_2_ledger_is_upgraded_and_its_rows_keep_an_unknown_kind(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.record_stop("budget_exhausted", "old row")
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE entries DROP COLUMN payload_kind")
    db.execute("ALTER TABLE entries DROP COLUMN helper_key")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with Ledger(path, readonly=True) as ledger:  # read-only: the older schema is read as it is
        assert ledger.entries()[0].payload_kind is None and ledger.summary().in_shares == 0
    with Ledger(path) as ledger:
        assert ledger.entries()[0].payload_kind is None
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


# --------------------------------------------------------------------------- helper-enrol over HTTP


def test_helper_enrol_pins_a_real_helper_and_status_shows_it(tmp_path, fake, capsys):
    config = enrol(tmp_path, fake)
    silo_id = config.enrolment.silo_id
    with running_helper(tmp_path / "helper", federation=fake.federation,
                        coordinator_key=b64e(fake.identity.public().signing)) as helper:
        keys = helper.init["helper_keys"]
        token = helper.admin("POST", "/admin/silos", json={"silo_id": silo_id}).json()["token"]
        wrong = Identity.generate().public().fingerprints()["signing"]
        with pytest.raises(SecaggError) as info:  # the operator's fingerprint is checked; the token is spent
            helper_enrol(config.data_dir, helper_url=helper.base_url, token=token, expected_fingerprint=wrong)
        assert info.value.reason is SecaggReason.KEY_MISMATCH and "revoke" in info.value.message
        assert SiloConfig.load(config.data_dir, environ={}).helper is None  # nothing pinned

        # A spent token is the helper's refusal, stated; nothing pinned.
        code = silo_main(["helper-enrol", "--data-dir", str(config.data_dir), "--helper-url", helper.base_url,
                          "--helper-token", token])
        assert code == 1 and "refused" in capsys.readouterr().err

    fresh_fake = FakeCoordinator(clock=real_now)
    config = enrol(tmp_path, fresh_fake, name="fresh")
    with running_helper(tmp_path / "helper2", federation=fresh_fake.federation,
                        coordinator_key=b64e(fresh_fake.identity.public().signing)) as helper:
        keys = helper.init["helper_keys"]
        token = helper.admin("POST", "/admin/silos", json={"silo_id": config.enrolment.silo_id}).json()["token"]
        code = silo_main(["helper-enrol", "--data-dir", str(config.data_dir), "--helper-url", helper.base_url,
                          "--helper-token", token, "--helper-fingerprint",
                          helper.init["helper_fingerprints"]["signing"], "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert json.loads(out.out)["helper_fingerprints"] == helper.init["helper_fingerprints"]
        pinned = SiloConfig.load(config.data_dir, environ={}).helper
        assert (pinned.url, pinned.signing_key, pinned.hpke_key) == (helper.base_url, keys["signing_key"],
                                                                     keys["hpke_key"])
        code = silo_main(["status", "--data-dir", str(config.data_dir)])
        assert code == 0 and "enrolled with the helper at" in capsys.readouterr().out
        with pytest.raises(ConfigError):  # once is enough; a second enrolment must be deliberate
            helper_enrol(config.data_dir, helper_url=helper.base_url, token="x")


def test_init_refuses_a_helper_token_without_its_url(tmp_path, capsys):
    code = silo_main(["init", "--data-dir", str(tmp_path / "s"), "--coordinator", "https://c.example",
                      "--token", "t", "--helper-token", "h"])
    assert code == 1 and "--helper-url and --helper-token go together" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_enrolment_pins_the_signed_setting_and_refuses_an_altered_copy(tmp_path, fake, helper):
    fake.secure_aggregation = setting_for(helper.public().to_json())
    config = enrol(tmp_path, fake)
    assert SiloConfig.load(config.data_dir, environ={}).enrolment.secure_aggregation == fake.secure_aggregation

    def altered(request: httpx.Request) -> httpx.Response:
        response = fake.handle(request)
        if request.url.path == "/api/v1/enroll":  # a man in the middle swaps the helper's keys
            body = json.loads(response.content)
            body["federation"]["secure_aggregation"] = setting_for(Identity.generate().public().to_json())
            return httpx.Response(response.status_code, json=body)
        return response

    with pytest.raises(Untrusted) as info:
        init_silo(data_dir=tmp_path / "other", coordinator_url="https://coordinator.example",
                  token=fake.create_token("other"), transport=httpx.MockTransport(altered), environ={})
    assert "secure_aggregation" in str(info.value) and not (tmp_path / "other" / "silo.toml").exists()

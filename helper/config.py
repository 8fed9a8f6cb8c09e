"""The helper's data directory: ``helper.toml`` (its policy and database) and ``keys/`` (0700).

``helper.toml``::

    database_url = "sqlite:///<dir>/helper.db"     # or postgresql+psycopg://...
    federation = "fed-..."
    k_min = 3
    coordinator_signing_key = "<base64url raw Ed25519>"   # pinned at init
    [mask]                                         # privacy.secagg.MaskSettings
    clip = 1.0
    scale = 65536
    max_updates = 64
    max_weight = 256
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict
from pathlib import Path

import tomli_w

from privacy import secagg
from privacy.keys import Identity, b64d, make_private_dir, signing_public_from_raw, write_private

from .opening import HelperPolicy

CONFIG_FILE = "helper.toml"
KEY_DIR = "keys"


def write_config(directory: Path, *, database_url: str, federation: str, k_min: int,
                 coordinator_signing_key: str, mask: secagg.MaskSettings) -> None:
    """Write ``helper.toml`` (0600: it may hold a database password). Refuses unsafe settings."""
    secagg.check_settings(mask)
    if not isinstance(k_min, int) or not 2 <= k_min <= mask.max_updates:
        raise secagg.UnsafeSettings(f"k_min must be an integer in [2, {mask.max_updates}], not {k_min!r}")
    signing_public_from_raw(b64d(coordinator_signing_key))  # a real Ed25519 key, or KeyFileError
    make_private_dir(directory)
    body = {"database_url": database_url, "federation": federation, "k_min": k_min,
            "coordinator_signing_key": coordinator_signing_key, "mask": asdict(mask)}
    write_private(Path(directory) / CONFIG_FILE, tomli_w.dumps(body).encode(), replace=False)


def read_config(directory: Path) -> dict:
    with open(Path(directory) / CONFIG_FILE, "rb") as f:
        return tomllib.load(f)


def load_policy(directory: Path) -> tuple[str, HelperPolicy]:
    """The database URL and the policy the helper enforces (settings re-checked at every start)."""
    cfg = read_config(directory)
    mask = secagg.check_settings(secagg.MaskSettings(**cfg["mask"]))
    policy = HelperPolicy(
        federation=cfg["federation"], k_min=int(cfg["k_min"]), mask=mask,
        coordinator_key=signing_public_from_raw(b64d(cfg["coordinator_signing_key"])),
        identity=Identity.load(Path(directory) / KEY_DIR),
    )
    return cfg["database_url"], policy

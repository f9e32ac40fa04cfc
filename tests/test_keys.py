"""keys.yaml: one schema, and every wrong shape refused with the file, the field and the fix (a wrong shape used to
be accepted silently, every key then getting 401, or to fail with a bare AttributeError)."""

import pytest

from tunelab.errors import TunelabError
from tunelab.server.auth import Keys, hash_key

ACME, OPS = hash_key("sk-acme"), hash_key("sk-ops")


def load(tmp_path, text: str) -> Keys:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return Keys.load(path)


def test_a_good_keys_file(tmp_path):
    keys = load(tmp_path, f"tenants:\n  acme: {{key_sha256: [{ACME}], adapters: [acme-sql]}}\n"
                          f"  ops: {{key_sha256: {OPS}, admin: true}}\n")
    acme, ops = keys.tenant("Bearer sk-acme"), keys.tenant("bearer sk-ops")
    assert acme.name == "acme" and acme.may_use("acme-sql") and not acme.may_use("other") and not acme.admin
    assert ops.admin and ops.may_use("anything")
    assert keys.tenant("Bearer sk-wrong") is None and keys.tenant(None) is None


@pytest.mark.parametrize("text, says", [
    ("- acme\n- ops\n", "(the file): Input should be a valid dictionary"),  # was: AttributeError
    (f"acme: {{key_sha256: [{ACME}]}}\n", "unknown key 'acme'"),  # tenants: forgotten: was accepted, all 401
    ("", "tenants: Field required"),  # an empty file: was accepted, every key 401
    (f"tenants:\n  - {{key_sha256: [{ACME}]}}\n", "tenants: Input should be a valid dictionary"),  # was: AttributeError
    ("tenants: {}\n", "tenants: Dictionary should have at least 1 item"),
    (f"tenants:\n  acme: {{keys: [{ACME}]}}\n", "unknown key 'tenants.acme.keys'"),
    (f"tenants:\n  acme: {{key_sha256: [{ACME}], adapter: [x]}}\n", "unknown key 'tenants.acme.adapter'"),
    ("tenants:\n  acme: {key_sha256: [sk-acme]}\n", "tenants.acme.key_sha256: 'sk-acme' is not a SHA-256 hex digest"),
    (f"tenants:\n  acme: {{key_sha256: [{ACME}], adapters: acme-sql}}\n", "tenants.acme.adapters: Input should be a "
                                                                         "valid list"),
    (f"tenants:\n  acme: {{key_sha256: [{ACME}]}}\n  beta: {{key_sha256: [{ACME}]}}\n", "also acme's"),
])
def test_a_wrong_shape_names_the_file_the_field_and_the_fix(tmp_path, text, says):
    with pytest.raises(TunelabError) as e:
        load(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "keys.yaml")) and says in msg
    if "also acme's" not in says:
        assert "--hash-key" in msg and "docs/serving.md" in msg  # the fix: the shape to write


def test_tunelab_serve_refuses_a_bad_keys_file_before_loading_the_model(tmp_path, tunelab):
    (tmp_path / "keys.yaml").write_text("- acme\n")
    code, out, err = tunelab("serve", "--model", tmp_path / "no-model-here", "--keys", tmp_path / "keys.yaml")
    assert code == 2 and "keys.yaml: invalid keys file" in err and "no-model-here" not in err

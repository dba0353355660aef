"""Manifest schema: round trip, canonical bytes, and every way parse_manifest refuses a document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.errors import ManifestError, UnsupportedFormatVersion
from fieldpack.shared.manifest import Manifest, MemoryNeeds, parse_manifest
from tests.shared.factories import make_manifest, make_member_files


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return make_manifest(make_member_files(tmp_path_factory.mktemp("members")))


def _doc(m: Manifest) -> dict:
    return json.loads(m.to_bytes())


def _bytes(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_round_trip_is_identical(manifest: Manifest) -> None:
    data = manifest.to_bytes()
    again = parse_manifest(data)
    assert again == manifest
    assert again.to_bytes() == data
    assert again.label == "demo@1.0.0"
    assert again.member(fmt.MODEL_NAME).size == manifest.member(fmt.MODEL_NAME).size


def test_canonical_bytes_sorted_utf8_newline(manifest: Manifest) -> None:
    data = manifest.to_bytes()
    assert data.endswith(b"}\n")
    # key order in the input does not matter: the bytes come out sorted
    doc = _doc(manifest)
    reversed_doc = dict(reversed(list(doc.items())))
    assert parse_manifest(_bytes(reversed_doc)).to_bytes() == data
    top_keys = [line.split('"')[1] for line in data.decode().splitlines() if line.startswith('  "')]
    assert top_keys == sorted(top_keys)
    # non-ASCII stays UTF-8, not \u escapes (what is signed is what a human reads)
    m2 = manifest.model_copy(update={"recipe": {"note": "Pumpe Nr. 3 – Störung"}})
    assert "Störung".encode() in m2.to_bytes()
    assert b"\\u" not in m2.to_bytes()


def test_rejects_nan_anywhere(manifest: Manifest) -> None:
    doc = _doc(manifest)
    text = json.dumps(doc).replace('"top1_agreement": 1.0', '"top1_agreement": NaN')
    assert "NaN" in text
    with pytest.raises(ManifestError, match="NaN"):
        parse_manifest(text.encode())


@pytest.mark.parametrize("data, match", [
    (b"\xff\xfe not utf-8", "not valid UTF-8 JSON"),
    (b"{not json", "not valid UTF-8 JSON"),
    (b"[1, 2]", "not a JSON object"),
])
def test_rejects_non_json(data: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as ei:
        parse_manifest(data)
    assert "\n" not in str(ei.value) and "Fix:" in str(ei.value)


def test_rejects_other_format(manifest: Manifest) -> None:
    doc = _doc(manifest)
    doc["format"] = "something-else"
    with pytest.raises(ManifestError, match="not a fieldpack manifest"):
        parse_manifest(_bytes(doc))


@pytest.mark.parametrize("version", [0, 3, 999, "1", None])
def test_rejects_unsupported_version(manifest: Manifest, version: object) -> None:
    doc = _doc(manifest)
    doc["format_version"] = version
    with pytest.raises(UnsupportedFormatVersion, match="format_version") as ei:
        parse_manifest(_bytes(doc))
    assert "Fix:" in str(ei.value)


def test_unknown_key_is_an_error_naming_it(manifest: Manifest) -> None:
    doc = _doc(manifest)
    doc["model"]["surprise"] = 1
    with pytest.raises(ManifestError, match=r"model\.surprise"):
        parse_manifest(_bytes(doc))


def test_missing_key_is_an_error_naming_it(manifest: Manifest) -> None:
    doc = _doc(manifest)
    del doc["runtime"]["n_ctx"]
    with pytest.raises(ManifestError, match=r"runtime\.n_ctx"):
        parse_manifest(_bytes(doc))


def test_wrong_type_is_an_error(manifest: Manifest) -> None:
    doc = _doc(manifest)
    doc["model"]["n_layer"] = "many"
    with pytest.raises(ManifestError, match=r"model\.n_layer"):
        parse_manifest(_bytes(doc))


def test_memory_parts_must_sum(manifest: Manifest) -> None:
    doc = _doc(manifest)
    doc["runtime"]["memory"]["total_bytes"] += 1
    with pytest.raises(ManifestError, match="sum of parts"):
        parse_manifest(_bytes(doc))
    with pytest.raises(ValueError):
        MemoryNeeds(weights_bytes=1, kv_cache_bytes=1, embedder_bytes=1, index_bytes=1, overhead_bytes=1,
                    total_bytes=4)


@pytest.mark.parametrize("field, value", [
    ("name", "has space"), ("name", "../up"), ("name", ""), ("version", "1/2"), ("version", "x" * 40),
])
def test_name_and_version_are_restricted(manifest: Manifest, field: str, value: str) -> None:
    doc = _doc(manifest)
    doc[field] = value
    with pytest.raises(ManifestError, match=field):
        parse_manifest(_bytes(doc))


def test_required_members_duplicates_and_self_listing(manifest: Manifest) -> None:
    doc = _doc(manifest)
    doc["members"] = [m for m in doc["members"] if m["name"] != fmt.INDEX_NAME]
    with pytest.raises(ManifestError, match="required members missing: index.sqlite"):
        parse_manifest(_bytes(doc))

    doc = _doc(manifest)
    doc["members"].append(dict(doc["members"][0]))
    with pytest.raises(ManifestError, match="duplicate"):
        parse_manifest(_bytes(doc))

    doc = _doc(manifest)
    doc["members"].append({"name": fmt.MANIFEST_NAME, "size": 1, "sha256": "0" * 64})
    with pytest.raises(ManifestError, match="may not list itself"):
        parse_manifest(_bytes(doc))


@pytest.mark.parametrize("digest", ["A" * 64, "0" * 63, "g" * 64])
def test_member_sha256_must_be_lowercase_hex(manifest: Manifest, digest: str) -> None:
    doc = _doc(manifest)
    doc["members"][0]["sha256"] = digest
    with pytest.raises(ManifestError, match="sha256"):
        parse_manifest(_bytes(doc))


def test_member_lookup(manifest: Manifest) -> None:
    with pytest.raises(ManifestError, match="no member 'nope'"):
        manifest.member("nope")


def test_origin_is_named_in_errors(manifest: Manifest) -> None:
    with pytest.raises(ManifestError, match=r"^x\.fpk:manifest\.json"):
        parse_manifest(b"{", origin="x.fpk:manifest.json")


def test_factory_files_match_manifest(tmp_path: Path) -> None:
    files = make_member_files(tmp_path, model_bytes=10_000, seed=3)
    m = make_manifest(files)
    assert [x.name for x in m.members][: len(fmt.REQUIRED_MEMBERS)] == list(fmt.REQUIRED_MEMBERS)
    assert m.member(fmt.MODEL_NAME).size == 10_000


def test_bundle_without_prompt_format_reads_as_chat(manifest: Manifest) -> None:
    """Bundles built before ``runtime.prompt_format`` existed keep today's behaviour (the chat template)."""
    raw = json.loads(manifest.to_bytes())
    raw["runtime"].pop("prompt_format", None)
    raw["runtime"].pop("completion_template", None)
    m = parse_manifest(json.dumps(raw).encode())
    assert m.runtime.prompt_format == "chat" and m.runtime.completion_template is None


def test_completion_format_needs_a_template_with_its_placeholders(manifest: Manifest) -> None:
    raw = json.loads(manifest.to_bytes())
    raw["runtime"]["prompt_format"] = "completion"
    with pytest.raises(ManifestError, match="completion_template"):
        parse_manifest(json.dumps(raw).encode())
    raw["runtime"]["completion_template"] = "Question: {question}\nAnswer:"
    with pytest.raises(ManifestError, match=r"\{sources\}"):
        parse_manifest(json.dumps(raw).encode())
    raw["runtime"]["completion_template"] = "{sources}\nQuestion: {question}\nAnswer:"
    assert parse_manifest(json.dumps(raw).encode()).runtime.prompt_format == "completion"
    raw["runtime"]["prompt_format"] = "json"
    with pytest.raises(ManifestError, match="prompt_format"):
        parse_manifest(json.dumps(raw).encode())


_ADAPTER = {"member": fmt.ADAPTER_NAME, "method": "dapt", "rank": 16, "alpha": 32.0, "scale": 1.0, "tensors": 252,
            "size_bytes": 100, "check_kld_mean": 1e-5, "check_top1_agreement": 1.0}


def _with_adapter(manifest: Manifest, *, version: int = fmt.ADAPTER_FORMAT_VERSION, member: bool = True,
                  entry: bool = True) -> dict:
    doc = _doc(manifest)
    doc["format_version"] = version
    if member:
        doc["members"].append({"name": fmt.ADAPTER_NAME, "size": 100, "sha256": "0" * 64})
    if entry:
        doc["adapter"] = dict(_ADAPTER)
    return doc


def test_format_1_manifest_carries_no_adapter_key(manifest: Manifest) -> None:
    """Bundles without an adapter stay byte-for-byte what a format-1 reader (extra keys forbidden) accepts."""
    assert manifest.adapter is None and "adapter" not in _doc(manifest)


def test_adapter_manifest_round_trips_as_format_2(manifest: Manifest) -> None:
    m = parse_manifest(_bytes(_with_adapter(manifest)))
    assert m.adapter is not None and m.adapter.rank == 16 and m.format_version == 2
    assert parse_manifest(m.to_bytes()) == m


@pytest.mark.parametrize("kw,needle", [
    (dict(version=1), "adapter needs format_version 2"),
    (dict(member=False), "adapter member 'adapter.gguf' is not among the members"),
    (dict(entry=False), "no adapter entry"),
])
def test_adapter_entry_and_member_go_together_in_format_2(manifest: Manifest, kw: dict, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle):
        parse_manifest(_bytes(_with_adapter(manifest, **kw)))

"""HL7 v2 messages without a server: parsing the real messages of tests/data/hl7, their values as DICOM,
the ACKs, and the parser's refusal of anything else (hypothesis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomweb.cli import main
from hl7.message import AA, AE, AR, Delimiters, HL7Error, ack, header_of, parse, segments, unescape, value
from hl7.orders import orders_of
from hl7.values import code, identifiers, patient_attributes, person_name

DATA = Path(__file__).parent / "data" / "hl7"


def received(name: str):  # type: ignore[no-untyped-def]
    return parse((DATA / name).read_bytes())


@pytest.mark.parametrize(
    ("name", "kind", "version", "codec", "ids"),
    [
        ("adt_a08_v25.hl7", "ADT^A08", "2.5", "utf-8", ["MSH", "EVN", "PID", "PV1"]),
        ("adt_a31_v231.hl7", "ADT^A31", "2.3.1", "latin-1", ["MSH", "EVN", "PID", "PV1"]),
        ("adt_a40_v24.hl7", "ADT^A40", "2.4", "utf-8", ["MSH", "EVN", "PID", "PD1", "MRG"]),
        ("orm_o01_new_v231.hl7", "ORM^O01", "2.3.1", "utf-8", ["MSH", "PID", "PV1", "ORC", "OBR", "ZDS"]),
        ("omi_o23_v251.hl7", "OMI^O23", "2.5.1", "utf-8", ["MSH", "PID", "PV1", "ORC", "TQ1", "OBR", "IPC"]),
    ],
)
def test_real_messages_parse(name: str, kind: str, version: str, codec: str, ids: list[str]) -> None:
    r = received(name)
    assert (r.header.message_type, r.header.version, r.codec) == (kind, version, codec)
    assert [s.name for s in r.segments] == ids


def test_patient_values_as_dicom() -> None:
    pid = segments(received("adt_a08_v25.hl7"), "PID")[0]
    ids = [(i.id, i.issuer) for i in identifiers(pid, 3)]
    assert ids == [("PAT-HL7-1", "STJOHNS"), ("987-65-4321", "SSA")]
    # XPN family^given^middle^suffix^prefix^degree^type -> PN family^given^middle^prefix^suffix; legal name
    assert patient_attributes(pid) == {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Meier-Schulz^Anna^Maria^Dr."}]},
        "00100030": {"vr": "DA", "Value": ["19801224"]},
        "00100040": {"vr": "CS", "Value": ["F"]},
    }
    latin = segments(received("adt_a31_v231.hl7"), "PID")[0]
    assert person_name(latin, 5) == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen^^Prof. Dr."}]}


def test_order_groups_and_codes() -> None:
    (order,) = orders_of(received("omi_o23_v251.hl7"))
    assert value(order.orc, 1) == "NW" and sorted(order.details) == ["IPC", "OBR", "TQ1"]
    assert code(order.details["OBR"][0], 4) == {
        "00080100": {"vr": "SH", "Value": ["MRBRAIN"]},
        "00080102": {"vr": "SH", "Value": ["L"]},
        "00080104": {"vr": "LO", "Value": ["MR brain"]},
    }


def test_unescape() -> None:
    d = Delimiters()
    assert unescape(r"Smith\T\Jones \F\ A\S\B\R\C\E\D", d) == "Smith&Jones | A^B~C\\D"
    assert unescape(r"\X4D\\X7565\ller", d) == "Müller".replace("ü", "ue")  # hex data, as Latin-1 bytes
    assert unescape(r"bold \H\text\N\ line\.br\two", d) == "bold text line\ntwo"
    assert unescape("trailing \\", d) == "trailing \\"


def test_hexadecimal_escapes_are_bytes_of_the_messages_character_set() -> None:
    """\\Xhh\\ is data in the message's encoding: in a UTF-8 message \\XC3BC\\ is one ü (it was read as
    Latin-1, two characters, and 'MÃ¼ller' went into the patient's studies)."""
    raw = (DATA / "adt_a08_v25.hl7").read_bytes().replace(b"Meier-Schulz", b"M\\XC3BC\\ller")
    r = parse(raw)
    assert r.codec == "utf-8"
    name = person_name(segments(r, "PID")[0], 5)
    assert name == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Anna^Maria^Dr."}]}
    assert unescape(r"M\XFC\ller", Delimiters(codec="utf-8")) == "Müller"  # not UTF-8: read as Latin-1
    assert unescape(r"M\XFC\ller", Delimiters(codec="iso8859-15")) == "Müller"


def test_ack_of_a_message_and_of_garbage() -> None:
    r = received("orm_o01_new_v231.hl7")
    text = ack(r.header, AE, error=HL7Error(AE, 204, "no work item was made from order ORD|1^2", "ORC^1^2"))
    msh, msa, err = text.rstrip("\r").split("\r")
    assert msh.startswith("MSH|^~\\&|DICOMWEB|RADIOLOGY|HIS|STJOHNS|") and "|ACK^O01^ACK|" in msh
    assert msa == r"MSA|AE|ORM00000001|no work item was made from order ORD\F\1\S\2"
    assert err.split("|")[1:5] == ["ORC^1^2^204&Unknown key identifier&HL70357", "ORC^1^2",
                                   "204^Unknown key identifier^HL70357", "E"]  # fmt: skip
    # an ACK is itself a message this parser reads
    assert parse(text.encode()).header.message_type == "ACK^O01"
    refused = ack(None, AR, error=HL7Error(AR, 100, "the message does not start with an MSH segment", "MSH"))
    assert refused.split("\r")[1] == "MSA|AR||the message does not start with an MSH segment"
    # an MSH-18 this archive cannot read: the ACK is UTF-8, and says so (it echoed KOI8-R)
    raw = b"MSH|^~\\&|HIS|HOSP|DICOMWEB|RAD|20261207120000||ADT^A08|C1|P|2.5||||||KOI8-R\rPID|1||P1"
    with pytest.raises(HL7Error) as unreadable:
        parse(raw)
    answer = ack(header_of(raw), AR, error=unreadable.value).split("\r")[0]
    assert answer.split("|")[17] == "UNICODE UTF-8"


def test_msa_3_is_cut_to_80_characters_between_escape_sequences() -> None:
    """MSA-3 (ST, 80 characters) was cut after escaping: "...x\\S" ended the field inside an escape
    sequence. ERR-8 keeps the whole reason."""
    reason = "x" * 78 + "^^^"
    msa, err = ack(None, AE, error=HL7Error(AE, 102, reason)).split("\r")[1:3]
    assert msa == "MSA|AE||" + "x" * 78
    assert err.split("|")[8] == "x" * 78 + "\\S\\" * 3
    assert ack(None, AA, text="y" * 77 + "|").split("\r")[1] == "MSA|AA||" + "y" * 77 + "\\F\\"  # fits
    assert ack(None, AA, text="y" * 78 + "|").split("\r")[1] == "MSA|AA||" + "y" * 78


@pytest.mark.parametrize("encoding", ["", "^", "^~", "^~\\", "^^^^", "^~\\&&", "^~EPICADT", "^~\\&#$"])
def test_a_message_with_unusable_encoding_characters_is_answered_in_the_standard_ones(encoding: str) -> None:
    """MSH-2 that does not declare four distinct encoding characters: the ACK (AR 102) is written with
    ^~\\& (with fewer than two, building it raised IndexError and the sender got no ACK at all)."""
    raw = f"MSH|{encoding}|HIS|HOSP|DICOMWEB|RAD|20261207120000||ADT^A08|CTRL9|P|2.5\rPID|1||P1".encode()
    with pytest.raises(HL7Error) as refused:
        parse(raw)
    assert (refused.value.ack, refused.value.code) == (AR, 102)
    msh, msa, err = ack(header_of(raw), AR, error=refused.value).rstrip("\r").split("\r")
    assert msh.startswith("MSH|^~\\&|DICOMWEB|")
    assert msa.startswith("MSA|AR|")
    assert err.split("|")[3] == "102^Data type error^HL70357"


@pytest.mark.parametrize("rest", ["MSH", "PID|1\rMSH", "MSHX", "PID|1|\r\rMSH|^~\\&|HIS"])
def test_a_second_msh_segment_is_refused(rest: str) -> None:
    """One message per MLLP frame: an MSH segment after the first is a segment sequence error (it crashed
    the parser when it had no field separator; hypothesis found it)."""
    raw = (HEADER.format(type="ADT^A08", n=1, version="2.5") + rest).encode()
    with pytest.raises(HL7Error) as refused:
        parse(raw)
    assert (refused.value.ack, refused.value.code) == (AR, 100)


# --- hypothesis: the parser refuses garbage with an HL7Error (AR or AE), never another exception ------------

HEADER = "MSH|^~\\&|HIS|HOSP|DICOMWEB|RAD|20261207120000||{type}|CTRL{n}|P|{version}\r"
SUPPORTED = ("ADT^A08", "ADT^A31", "ADT^A40", "ORM^O01", "OMI^O23")


def check_parse(raw: bytes) -> None:
    try:
        r = parse(raw)
    except HL7Error as exc:
        assert exc.ack in (AE, AR) and 100 <= exc.code <= 207 and exc.text
        answer = ack(header_of(raw), exc.ack, error=exc)  # it can always be answered, as the listener does
        assert parse(answer.encode()).header.message_code == "ACK"
        return
    assert r.segments[0].name == "MSH" and r.header.control_id


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_any_bytes_are_parsed_or_refused(raw: bytes) -> None:
    check_parse(raw)


segment_text = st.text(
    alphabet=st.sampled_from(list("|^~\\&\r\n ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-éü")), max_size=200
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([*SUPPORTED, "ADT", "", "ZZZ^Z01", "ADT^A08^ADT_A01^X", "^A08"]),
    st.sampled_from(["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.1", "", "3.0", "2.5^x"]),
    st.integers(0, 10**6),
    segment_text,
)
def test_headers_with_garbage_after_them(kind: str, version: str, n: int, rest: str) -> None:
    check_parse((HEADER.format(type=kind, n=n, version=version) + rest).encode())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_real_messages_with_bytes_replaced(at: int, junk: bytes) -> None:
    """A real message damaged somewhere (its header included) is parsed or refused, never crashes."""
    raw = (DATA / "adt_a08_v25.hl7").read_bytes()
    position = at % len(raw)
    check_parse(raw[:position] + junk + raw[position + len(junk) :])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["messages", "--limit", "-1"], "argument --limit: must be a whole number of at least 1, not '-1'"),
        (["show", "99999999999999999999"], "argument message_id: is a message id (a whole number from 1), "
         "not '99999999999999999999'"),
        (["replay", "0"], "argument message_id: is a message id (a whole number from 1), not '0'"),
    ],
)  # fmt: skip
def test_hl7_commands_refuse_numbers_the_log_cannot_take(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were tracebacks from PostgreSQL (a negative LIMIT) and asyncpg (an id past bigint)."""
    with pytest.raises(SystemExit) as exited:
        main(["hl7", *argv, "--database-url", "postgresql://nowhere.invalid/x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(error)

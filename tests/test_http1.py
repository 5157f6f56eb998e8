"""The HTTP/1 codec (fastgw/_core/http1.pyx): the generated known-header table and the grammar
helpers both directions and the Python-level readers and writers share."""
import importlib.util
from pathlib import Path

import pytest

from fastgw._core import http1

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_headers", ROOT / "tools" / "gen_headers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_header_table_is_what_the_generator_writes():
    gen = _generator()
    assert (ROOT / "fastgw" / "_core" / "headers.pxi").read_text() == gen.generate()


@pytest.mark.parametrize("index_name", list(enumerate(_generator().HEADERS, 1)))
def test_every_listed_name_maps_to_its_enum_in_any_case(index_name):
    index, name = index_name
    for spelling in (name, name.upper(), name.title(), name[:1].upper() + name[1:]):
        assert http1.header_id(spelling.encode()) == index


@pytest.mark.parametrize("name", [b"", b"t", b"tf", b"hosts", b"hos", b"Content-Lengt", b"Content_Length",
                                  b"content-length ", b"x-forwarded-fox", b"\xc8ost", b"hOsT\x00"])
def test_other_names_are_other(name):
    assert http1.header_id(name) == 0


@pytest.mark.parametrize("name, hop", [(b"Connection", True), (b"keep-alive", True), (b"TE", True),
                                       (b"Trailer", True), (b"Upgrade", True), (b"Proxy-Authorization", True),
                                       (b"proxy-thing", True), (b"Proxy-", False), (b"Host", False),
                                       (b"Content-Length", False), (b"Transfer-Encoding", False),
                                       (b"X-Proxy-Thing", False), (b"Date", False)])
def test_hop_by_hop_fields(name, hop):
    assert http1.hop_by_hop(name) is hop


@pytest.mark.parametrize("value, length", [(b"0", 0), (b"42", 42), (b"007", 7), (b"9" * 18, int("9" * 18)),
                                           (b"9" * 19, -1), (b"", -1), (b"+3", -1), (b"-1", -1), (b" 3", -1),
                                           (b"3 ", -1), (b"3,3", -1), (b"3, 3", -1), (b"\xd9\xa1", -1)])
def test_content_length_is_digits_only(value, length):
    assert http1.content_length(value) == length


@pytest.mark.parametrize("value, flags", [(b"close", 1), (b"Keep-Alive", 2), (b"close, keep-alive", 3),
                                          (b"Upgrade", 12), (b"X-Thing", 4), (b" ,, close ,", 1), (b"", 0),
                                          (b"closed", 4)])
def test_connection_options(value, flags):
    assert http1.connection_option_flags(value) == flags


def test_connection_tokens_and_drop_named():
    assert http1.connection_tokens(b"close, X-A ,Keep-Alive, upgrade,,") == [b"x-a", b"upgrade"]
    assert http1.drop_named([b"X-A", b"1", b"Host", b"h", b"x-a", b"2"], [b"x-a"]) == [b"Host", b"h"]


def test_heads_written():
    assert http1.request_head("GET", "/a?b", [("Host", "x"), ("Connection", "close")], "k: v\r\n") == \
        b"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: close\r\nk: v\r\n\r\n"
    assert http1.response_head(204, "No Content", {"date": "d"}.items()) == \
        b"HTTP/1.1 204 No Content\r\ndate: d\r\n\r\n"
    assert http1.chunk(b"hello" * 4) == b"14\r\n" + b"hello" * 4 + b"\r\n"
    assert http1.LAST_CHUNK == b"0\r\n\r\n"


@pytest.mark.parametrize("name, valid", [("x-a", True), ("A!#$%&'*+-.^_`|~9", True), ("", False),
                                         ("a b", False), ("a:", False), ("é", False), ("a\n", False)])
def test_field_names(name, valid):
    assert http1.valid_field_name(name) is valid


@pytest.mark.parametrize("value, splits", [("a b\t", False), ("a\rb", True), ("a\n", True), ("\x00", True),
                                           ("é", False)])
def test_values_that_split_a_head(value, splits):
    assert http1.splits_head(value) is splits

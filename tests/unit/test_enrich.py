"""Unit tests for udfs.enrich: user agents, URLs/UTM/click ids, referrers, geo, the enriched record.

``bench_enrich(n)`` at the bottom is a micro-benchmark (not a test):
``.venv/bin/python -m tests.unit.test_enrich [n]`` prints µs/event for validate + enrich + to_json.
"""

from __future__ import annotations

import pickle
import random
import sys
import time
from typing import Any

import orjson
import pytest

from udfs.enrich import (
    ENRICHED_FIELDS,
    EnrichOptions,
    anonymize_ip,
    classify_referrer,
    country_of,
    enrich,
    enrich_batch,
    parse_page_url,
    to_json,
    to_json_batch,
    ua_info,
    warm_up,
)
from udfs.validation import ValidEvent, validate

pytestmark = pytest.mark.unit

RECEIVED = 1_795_377_605_000  # 2026-11-22T20:00:05.000Z

CONTRACT_FIELDS = (
    "message_id type event anonymous_id user_id user_key timestamp sent_at received_at ip user_agent "
    "page_url page_path page_host referrer locale properties traits browser browser_version os device_type "
    "is_bot country utm_source utm_medium utm_campaign utm_term utm_content click_id_type referrer_type "
    "referrer_host"
).split()

# ------------------------------------------------------------------------------------- user agents

UA_CASES: list[tuple[tuple[str, str, str, str, bool], str]] = [
    # ((browser, browser_version, os, device_type, is_bot), user agent)
    (("Chrome", "120.0", "Windows", "desktop", False),
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.0.0 Safari/537.36"),
    (("Firefox", "121.0", "Windows", "desktop", False),
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"),
    (("Edge", "120.0", "Windows", "desktop", False),
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91"),
    (("Safari", "17.2", "Mac OS X", "desktop", False),
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.2 Safari/605.1.15"),
    (("Chrome", "119.0", "Mac OS X", "desktop", False),
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/119.0.0.0 Safari/537.36"),
    (("Firefox", "121.0", "Mac OS X", "desktop", False),
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:121.0) Gecko/20100101 Firefox/121.0"),
    (("Edge", "120.0", "Mac OS X", "desktop", False),
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91"),
    (("Firefox", "120.0", "Ubuntu", "desktop", False),
     "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    (("Chrome", "118.0", "Linux", "desktop", False),
     "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/118.0.0.0 "
     "Safari/537.36"),
    (("Chrome", "120.0", "Chrome OS", "desktop", False),
     "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.0.0 Safari/537.36"),
    (("IE", "11.0", "Windows", "desktop", False),
     "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko"),
    (("Mobile Safari", "17.1", "iOS", "mobile", False),
     "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
     "like Gecko) Version/17.1.2 Mobile/15E148 Safari/604.1"),
    (("Chrome Mobile iOS", "120.0", "iOS", "mobile", False),
     "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
     "Gecko) CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1"),
    (("Chrome Mobile", "120.0", "Android", "mobile", False),
     "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.6099.144 Mobile Safari/537.36"),
    (("Chrome Mobile", "120.0", "Android", "mobile", False),
     "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.6099.43 Mobile Safari/537.36"),
    (("Samsung Internet", "23.0", "Android", "mobile", False),
     "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/23.0 Chrome/115.0.0.0 Mobile Safari/537.36"),
    (("Firefox Mobile", "121.0", "Android", "mobile", False),
     "Mozilla/5.0 (Android 14; Mobile; rv:121.0) Gecko/121.0 Firefox/121.0"),
    (("Mobile Safari", "16.6", "iOS", "tablet", False),
     "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/16.6 Mobile/15E148 Safari/604.1"),
    (("Chrome", "119.0", "Android", "tablet", False),
     "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/119.0.0.0 Safari/537.36"),
    (("Samsung Internet", "22.0", "Android", "tablet", False),
     "Mozilla/5.0 (Linux; Android 12; SAMSUNG SM-T870) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/22.0 Chrome/111.0.5563.116 Safari/537.36"),
    (("Firefox Mobile", "121.0", "Android", "tablet", False),
     "Mozilla/5.0 (Android 13; Tablet; rv:121.0) Gecko/121.0 Firefox/121.0"),
    (("Amazon Silk", "119.3", "Android", "tablet", False),
     "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Silk/119.3.1 like Chrome/119.0.6045.193 Safari/537.36"),
    (("Samsung Internet", "4.0", "Tizen", "other", False),
     "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36"),
    (("Googlebot", "2.1", "", "bot", True),
     "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
    (("Googlebot", "2.1", "Android", "bot", True),
     "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like "
     "Gecko) Chrome/119.0.6045.199 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
     "+http://www.google.com/bot.html)"),
    (("bingbot", "2.0", "", "bot", True),
     "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"),
    (("AhrefsBot", "7.0", "", "bot", True),
     "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)"),
    (("YandexBot", "3.0", "", "bot", True),
     "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)"),
    (("FacebookBot", "1.1", "", "bot", True),
     "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)"),
    (("curl", "8.4", "", "bot", True),
     "curl/8.4.0"),
    (("Python Requests", "2.31", "", "bot", True),
     "python-requests/2.31.0"),
    (("Wget", "1.21", "", "bot", True),
     "Wget/1.21.4"),
    (("HeadlessChrome", "120.0", "Linux", "bot", True),
     "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "HeadlessChrome/120.0.6099.109 Safari/537.36"),
    (("", "", "", "other", False),
     ""),
    (("", "", "", "other", False),
     "\x00\x01 ???"),
]  # fmt: skip


@pytest.mark.parametrize(("expected", "ua"), UA_CASES)
def test_user_agents(expected: tuple[str, str, str, str, bool], ua: str) -> None:
    info = ua_info(ua)
    assert (info.browser, info.browser_version, info.os, info.device_type, info.is_bot) == expected


def test_ua_info_is_cached() -> None:
    ua = UA_CASES[0][1]
    ua_info(ua)
    hits = ua_info.cache_info().hits
    assert ua_info(ua) is ua_info(ua)
    assert ua_info.cache_info().hits == hits + 2


# ------------------------------------------------------------------------------------------- URLs

URL_CASES = [
    # (url, host, path, (utm_source, utm_medium, utm_campaign, utm_term, utm_content), click_id_type)
    ("https://shop.example/p/42?utm_source=google&utm_medium=cpc&utm_campaign=xmas&utm_term=red+shoes"
     "&utm_content=ad1&gclid=Cj0KCQ", "shop.example", "/p/42", ("google", "cpc", "xmas", "red shoes", "ad1"),
     "google"),
    ("https://SHOP.Example:8443/P/42?utm_source=news#utm_medium=fragment", "shop.example", "/P/42",
     ("news", "", "", "", ""), ""),
    ("shop.example/p/42?utm_source=x", "shop.example", "/p/42", ("x", "", "", "", ""), ""),
    ("www.shop.example:8080?fbclid=IwAR", "www.shop.example", "/", ("", "", "", "", ""), "facebook"),
    ("https://bücher.example/über?utm_campaign=%C3%BCber%20sale", "bücher.example", "/über",
     ("", "", "über sale", "", ""), ""),
    ("https://xn--bcher-kva.example/", "xn--bcher-kva.example", "/", ("", "", "", "", ""), ""),
    ("https://shop.example/search?q=a%26b&utm_source=a%26b%3Dc", "shop.example", "/search",
     ("a&b=c", "", "", "", ""), ""),
    ("https://shop.example/?utm_source=&utm_source=first&utm_source=second", "shop.example", "/",
     ("first", "", "", "", ""), ""),
    ("https://shop.example/?msclkid=1&gclid=2", "shop.example", "/", ("", "", "", "", ""), "google"),
    ("https://shop.example/?ttclid=1&msclkid=2", "shop.example", "/", ("", "", "", "", ""), "microsoft"),
    ("https://shop.example/?gbraid=1", "shop.example", "/", ("", "", "", "", ""), "google"),
    ("https://shop.example/?wbraid=1", "shop.example", "/", ("", "", "", "", ""), "google"),
    ("https://shop.example/?ttclid=1", "shop.example", "/", ("", "", "", "", ""), "tiktok"),
    ("https://shop.example/?twclid=1", "shop.example", "/", ("", "", "", "", ""), "twitter"),
    ("https://shop.example/?li_fat_id=1", "shop.example", "/", ("", "", "", "", ""), "linkedin"),
    ("https://shop.example/?dclid=1", "shop.example", "/", ("", "", "", "", ""), "google"),
    ("https://shop.example/?yclid=1", "shop.example", "/", ("", "", "", "", ""), "yandex"),
    ("https://shop.example/?gclid=", "shop.example", "/", ("", "", "", "", ""), ""),
    ("https://user:pw@shop.example./a%20b/c", "shop.example", "/a%20b/c", ("", "", "", "", ""), ""),
    ("http://[2001:db8::1]:8080/x", "2001:db8::1", "/x", ("", "", "", "", ""), ""),
    ("/relative/path?utm_medium=email", "", "/relative/path", ("", "email", "", "", ""), ""),
    ("ht!tp://%%%", "", "", ("", "", "", "", ""), ""),
    ("http://[::1", "", "", ("", "", "", "", ""), ""),
    ("mailto:someone@shop.example", "", "", ("", "", "", "", ""), ""),
    ("javascript:alert(1)", "", "", ("", "", "", "", ""), ""),
    ("   ", "", "", ("", "", "", "", ""), ""),
    ("", "", "", ("", "", "", "", ""), ""),
    ("\x00\ufffd://\u202e", "", "", ("", "", "", "", ""), ""),
]  # fmt: skip


@pytest.mark.parametrize(("url", "host", "path", "utm", "click_id_type"), URL_CASES)
def test_page_urls(url: str, host: str, path: str, utm: tuple[str, ...], click_id_type: str) -> None:
    info = parse_page_url(url)
    assert (info.host, info.path) == (host, path)
    assert (info.utm_source, info.utm_medium, info.utm_campaign, info.utm_term, info.utm_content) == utm
    assert info.click_id_type == click_id_type


def test_page_url_fuzz_never_raises() -> None:
    rng = random.Random(11)
    alphabet = "abc:/?#[]@!$&'()*+,;=%.-_~ \t\x00é中" + "0123456789"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for candidate in (text, "http://" + text, "https://shop.example/?" + text):
            parse_page_url(candidate)
            classify_referrer(candidate, "shop.example")


# -------------------------------------------------------------------------------------- referrers

INTERNAL = EnrichOptions(internal_domains=("Shop-Blog.example", ".checkout.example"))

REFERRER_CASES = [
    # (referrer, page_host, utm_medium, referrer_type, referrer_host)
    ("", "shop.example", "", "direct", ""),
    (None, "shop.example", "", "direct", ""),
    ("https://shop.example/cart", "shop.example", "", "internal", "shop.example"),
    ("https://www.shop.example/", "shop.example", "", "internal", "www.shop.example"),
    ("https://shop.example/", "www.shop.example", "", "internal", "shop.example"),
    ("https://m.shop.example/", "shop.example", "", "internal", "m.shop.example"),
    ("https://shop-blog.example/post/1", "shop.example", "", "internal", "shop-blog.example"),
    ("https://eu.checkout.example/pay", "shop.example", "", "internal", "eu.checkout.example"),
    ("https://shop.example/", "shop.example", "email", "internal", "shop.example"),
    ("https://www.google.com/", "shop.example", "", "search", "www.google.com"),
    ("https://www.google.co.uk/search?q=shoes", "shop.example", "", "search", "www.google.co.uk"),
    ("https://google.de/", "shop.example", "", "search", "google.de"),
    ("https://www.google.com.br/", "shop.example", "", "search", "www.google.com.br"),
    ("https://www.bing.com/search?q=x", "shop.example", "", "search", "www.bing.com"),
    ("https://duckduckgo.com/", "shop.example", "", "search", "duckduckgo.com"),
    ("https://search.yahoo.com/search?p=x", "shop.example", "", "search", "search.yahoo.com"),
    ("https://www.baidu.com/link?url=x", "shop.example", "", "search", "www.baidu.com"),
    ("https://yandex.ru/search/?text=x", "shop.example", "", "search", "yandex.ru"),
    ("https://www.ecosia.org/search?q=x", "shop.example", "", "search", "www.ecosia.org"),
    ("android-app://com.google.android.googlequicksearchbox/", "shop.example", "", "search",
     "com.google.android.googlequicksearchbox"),
    ("https://l.facebook.com/l.php?u=x", "shop.example", "", "social", "l.facebook.com"),
    ("https://m.facebook.com/", "shop.example", "", "social", "m.facebook.com"),
    ("https://www.instagram.com/", "shop.example", "", "social", "www.instagram.com"),
    ("https://t.co/AbC123", "shop.example", "", "social", "t.co"),
    ("https://twitter.com/someone", "shop.example", "", "social", "twitter.com"),
    ("https://x.com/someone", "shop.example", "", "social", "x.com"),
    ("https://www.linkedin.com/feed/", "shop.example", "", "social", "www.linkedin.com"),
    ("https://lnkd.in/abc", "shop.example", "", "social", "lnkd.in"),
    ("https://out.reddit.com/t3_x", "shop.example", "", "social", "out.reddit.com"),
    ("https://www.pinterest.com/pin/1/", "shop.example", "", "social", "www.pinterest.com"),
    ("https://pinterest.de/", "shop.example", "", "social", "pinterest.de"),
    ("https://www.tiktok.com/@shop", "shop.example", "", "social", "www.tiktok.com"),
    ("https://www.youtube.com/watch?v=x", "shop.example", "", "social", "www.youtube.com"),
    ("https://mail.google.com/mail/u/0/", "shop.example", "", "email", "mail.google.com"),
    ("https://outlook.live.com/mail/0/inbox", "shop.example", "", "email", "outlook.live.com"),
    ("https://mail.yahoo.com/d/folders/1", "shop.example", "", "email", "mail.yahoo.com"),
    ("android-app://com.google.android.gm/", "shop.example", "", "email", "com.google.android.gm"),
    ("", "shop.example", "email", "email", ""),
    ("", "shop.example", "Email", "email", ""),
    ("https://news.example/article", "shop.example", "e-mail", "email", "news.example"),
    ("https://news.example/article", "shop.example", "", "other", "news.example"),
    ("https://google.evil.example/", "shop.example", "", "other", "google.evil.example"),
    ("https://notgoogle.com/", "shop.example", "", "other", "notgoogle.com"),
    ("https://shop.example.attacker.test/", "shop.example", "", "other", "shop.example.attacker.test"),
    ("garbage referrer", "shop.example", "", "other", ""),
    ("https://blog.example/", "", "", "other", "blog.example"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("referrer", "page_host", "utm_medium", "expected_type", "expected_host"), REFERRER_CASES
)
def test_referrer_classification(
    referrer: str | None, page_host: str, utm_medium: str, expected_type: str, expected_host: str
) -> None:
    assert classify_referrer(referrer, page_host, utm_medium, INTERNAL) == (expected_type, expected_host)


def test_options_pickle_for_udf_shipping() -> None:
    restored = pickle.loads(pickle.dumps(INTERNAL))
    assert restored == INTERNAL
    assert classify_referrer("https://x.shop-blog.example/", "shop.example", "", restored)[0] == "internal"


def test_options_normalize_internal_domains() -> None:
    assert INTERNAL.internal_domains == ("shop-blog.example", "checkout.example")
    assert EnrichOptions() == EnrichOptions()
    with pytest.raises(AttributeError):
        INTERNAL.anonymize_ip = True  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- geo/IP


@pytest.mark.parametrize(
    ("ip", "country"),
    [
        ("8.8.8.8", "US"),
        ("1.1.1.1", "AU"),
        ("81.2.69.142", "GB"),
        ("2001:4860:4860::8888", "US"),
        ("::ffff:8.8.8.8", "US"),
        ("192.168.1.10", ""),
        ("10.0.0.1", ""),
        ("127.0.0.1", ""),
        ("100.64.0.1", ""),
        ("203.0.113.9", ""),  # TEST-NET-3 documentation range
        ("::1", ""),
        ("fe80::1", ""),
        ("not an ip", ""),
        ("999.1.1.1", ""),
        ("", ""),
    ],
)
def test_country_of(ip: str, country: str) -> None:
    warm_up()
    assert country_of(ip) == country


@pytest.mark.parametrize(
    ("ip", "anonymized"),
    [
        ("203.0.113.9", "203.0.113.0"),
        ("8.8.8.8", "8.8.8.0"),
        ("2001:db8:85a3:1234:5678:8a2e:370:7334", "2001:db8:85a3::"),
        ("::ffff:8.8.4.4", "8.8.4.0"),
        ("garbage", ""),
        ("", ""),
    ],
)
def test_anonymize_ip(ip: str, anonymized: str) -> None:
    assert anonymize_ip(ip) == anonymized


# --------------------------------------------------------------------------------- enriched record


def raw_event(**overrides: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "message_id": "4f1c-0001",
        "type": "track",
        "event": "Product Viewed",
        "anonymous_id": "a-123",
        "user_id": None,
        "timestamp": "2026-11-22T20:00:00.123Z",
        "sent_at": "2026-11-22T20:00:01.000Z",
        "context": {
            "ip": "8.8.8.8",
            "user_agent": UA_CASES[0][1],
            "locale": "en-US",
            "page": {
                "url": "https://Shop.Example/p/42?utm_source=google&utm_medium=cpc&gclid=abc",
                "referrer": "https://www.google.com/",
                "title": "Deal LAS-DEC",
            },
        },
        "properties": {"deal_id": "LAS-DEC", "price": 129.0, "tags": ["a", "b"]},
        "traits": {},
    }
    ev.update(overrides)
    return ev


def valid(ev: dict[str, Any]) -> ValidEvent:
    result = validate(orjson.dumps(ev), received_at_ms=RECEIVED)
    assert isinstance(result, ValidEvent), result
    return result


def test_enriched_record_fields_and_values() -> None:
    record = enrich(valid(raw_event()), "a-123", EnrichOptions(internal_domains=("shop.example",)))
    assert set(CONTRACT_FIELDS) <= set(record)
    assert tuple(record) == ENRICHED_FIELDS
    assert set(record) - set(CONTRACT_FIELDS) == {
        "event_time_ms",
        "previous_id",
        "original_timestamp",
        "page_title",
    }
    assert record == {
        "message_id": "4f1c-0001",
        "type": "track",
        "event": "Product Viewed",
        "anonymous_id": "a-123",
        "user_id": None,
        "previous_id": None,
        "user_key": "a-123",
        "timestamp": "2026-11-22T20:00:04.123Z",  # skew-corrected: received_at - 0.877 s
        "event_time_ms": RECEIVED - 877,
        "original_timestamp": "2026-11-22T20:00:00.123Z",
        "sent_at": "2026-11-22T20:00:01.000Z",
        "received_at": "2026-11-22T20:00:05.000Z",
        "ip": "8.8.8.8",
        "user_agent": UA_CASES[0][1],
        "page_url": "https://Shop.Example/p/42?utm_source=google&utm_medium=cpc&gclid=abc",
        "page_path": "/p/42",
        "page_host": "shop.example",
        "page_title": "Deal LAS-DEC",
        "referrer": "https://www.google.com/",
        "locale": "en-US",
        "properties": {"deal_id": "LAS-DEC", "price": 129.0, "tags": ["a", "b"]},
        "traits": {},
        "browser": "Chrome",
        "browser_version": "120.0",
        "os": "Windows",
        "device_type": "desktop",
        "is_bot": False,
        "country": "US",
        "utm_source": "google",
        "utm_medium": "cpc",
        "utm_campaign": "",
        "utm_term": "",
        "utm_content": "",
        "click_id_type": "google",
        "referrer_type": "search",
        "referrer_host": "www.google.com",
    }


def test_enrich_minimal_event_and_json() -> None:
    ev = {"message_id": "m-2", "type": "page", "user_id": "u-9", "timestamp": RECEIVED - 1000}
    record = enrich(valid(ev), "u-9")
    assert record["sent_at"] is None
    assert record["anonymous_id"] is None and record["event"] is None
    assert record["timestamp"] == "2026-11-22T20:00:04.000Z"
    assert record["properties"] == {} and record["traits"] == {}
    for key in ("ip", "user_agent", "page_url", "page_path", "page_host", "referrer", "locale", "browser",
                "os", "country", "utm_source", "click_id_type", "referrer_host"):  # fmt: skip
        assert record[key] == "", key
    assert record["device_type"] == "other" and record["is_bot"] is False
    assert record["referrer_type"] == "direct"
    decoded = orjson.loads(to_json(record))
    assert decoded == record
    assert isinstance(decoded["properties"], dict)


def test_page_path_falls_back_to_context_page_path() -> None:
    ev = raw_event(context={"page": {"path": "/only/path", "url": None}})
    record = enrich(valid(ev), "a-123")
    assert (record["page_path"], record["page_host"], record["page_url"]) == ("/only/path", "", "")


def test_anonymize_ip_happens_after_geo() -> None:
    ev = raw_event()
    ev["context"]["ip"] = "8.8.8.8"
    record = enrich(valid(ev), "a-123", EnrichOptions(anonymize_ip=True))
    assert record["ip"] == "8.8.8.0"
    assert record["country"] == "US"
    record = enrich(valid(ev), "a-123", EnrichOptions(anonymize_ip=True, geoip=False))
    assert (record["ip"], record["country"]) == ("8.8.8.0", "")


def test_bot_and_tablet_through_enrich() -> None:
    ev = raw_event()
    ev["context"]["user_agent"] = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    record = enrich(valid(ev), "a-123")
    assert (record["is_bot"], record["device_type"], record["browser"]) == (True, "bot", "Googlebot")


def test_batch_entry_points() -> None:
    events = [valid(raw_event(message_id=f"m-{i}")) for i in range(3)]
    records = enrich_batch(events, ["k0", "k1", "k2"])
    assert [r["message_id"] for r in records] == ["m-0", "m-1", "m-2"]
    assert [r["user_key"] for r in records] == ["k0", "k1", "k2"]
    assert [orjson.loads(b)["message_id"] for b in to_json_batch(records)] == ["m-0", "m-1", "m-2"]
    with pytest.raises(ValueError):
        enrich_batch(events, ["k0"])


# ------------------------------------------------------------------------------- micro-benchmark


def _bench_payloads(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    uas = [case[1] for case in UA_CASES if case[1]]
    referrers = [
        "https://www.google.com/",
        "",
        "https://shop.example/cart",
        "https://t.co/x",
        "https://l.facebook.com/",
    ]
    users = [f"a-{i}" for i in range(max(1, n // 20))]
    ips = [
        f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        for _ in users
    ]
    payloads = []
    for i in range(n):
        u = rng.randrange(len(users))
        ev = raw_event(message_id=f"m-{i}", anonymous_id=users[u])
        url = f"https://shop.example/p/{rng.randint(1, 500)}?utm_source=google&utm_medium=cpc&gclid=x{i}"
        ev["context"] = {
            "ip": ips[u],
            "user_agent": uas[u % len(uas)],
            "locale": "en-US",
            "page": {
                "url": url,
                "referrer": rng.choice(referrers),
                "title": "Product",
            },
        }
        payloads.append(orjson.dumps(ev))
    return payloads


def bench_enrich(n: int = 20000, repeat: int = 3) -> float:
    """Best-of-``repeat`` µs per event for validate + enrich + to_json over ``n`` synthetic events.

    Events reuse a pool of ``n/20`` users (each with its own IP and user agent), as a real stream
    does; caches are warmed by a first pass so the number reflects steady state.
    """
    payloads = _bench_payloads(n)
    options = EnrichOptions(internal_domains=("shop.example",))

    def run() -> None:
        for payload in payloads:
            result = validate(payload, received_at_ms=RECEIVED)
            if isinstance(result, ValidEvent):
                to_json(enrich(result, "k", options))

    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    print(f"validate+enrich+to_json: {bench_enrich(count):.1f} µs/event")  # noqa: T201

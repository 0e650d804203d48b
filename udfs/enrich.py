"""Enrichment of validated raw events into the flat ``events.enriched`` record (contract fields).

:func:`enrich` takes a :class:`~udfs.validation.ValidEvent`, the resolved ``user_key`` and
:class:`EnrichOptions` and returns a flat dict; :func:`to_json` serialises it with orjson.

Per-event cost is kept low for the Python UDF workers:

* user-agent work (ua-parser + crawlerdetect) is cached per UA string (LRU), the data sets load
  lazily on first use;
* the geoip2fast database loads once, lazily; lookups are cached per IP (LRU);
* referrer classification is cached per referrer host; domain lists are module-level frozensets
  matched by walking the host's dot-suffixes (no regex per event);
* URL handling uses :mod:`urllib.parse`; the query string is only parsed when it can contain a
  UTM parameter or a click id.

Field conventions: times are ISO-8601 UTC strings with milliseconds (``...Z``); ``timestamp`` is
the skew-corrected event time (same instant as ``event_time_ms``) and ``original_timestamp`` the
client's value. Identity fields taken from the raw event (``event anonymous_id user_id previous_id``)
and ``sent_at`` stay ``null`` when absent; every derived string field is ``""`` when unknown.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import SplitResult, unquote_plus, urlsplit

import orjson
import ua_parser
from crawlerdetect import CrawlerDetect

from udfs.timeutil import format_ms, format_ms_or_none
from udfs.validation import ValidEvent

__all__ = [
    "CLICK_IDS",
    "DEFAULT_OPTIONS",
    "ENRICHED_FIELDS",
    "EMAIL_DOMAINS",
    "SEARCH_DOMAINS",
    "SOCIAL_DOMAINS",
    "EnrichOptions",
    "UAInfo",
    "UrlInfo",
    "anonymize_ip",
    "classify_referrer",
    "country_of",
    "enrich",
    "enrich_batch",
    "parse_page_url",
    "to_json",
    "to_json_batch",
    "ua_info",
    "warm_up",
]

log = logging.getLogger(__name__)

#: Field names of an enriched event, in output order (contract fields plus a few extras).
ENRICHED_FIELDS: tuple[str, ...] = (
    "message_id", "type", "event", "anonymous_id", "user_id", "previous_id", "user_key",
    "timestamp", "event_time_ms", "original_timestamp", "sent_at", "received_at",
    "ip", "user_agent", "page_url", "page_path", "page_host", "page_title", "referrer", "locale",
    "properties", "traits",
    "browser", "browser_version", "os", "device_type", "is_bot", "country",
    "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "click_id_type",
    "referrer_type", "referrer_host",
)  # fmt: skip

_UA_CACHE_SIZE = 16384
_IP_CACHE_SIZE = 65536
_HOST_CACHE_SIZE = 8192
_URL_BASE_CACHE_SIZE = 16384


# --------------------------------------------------------------------------------------------------
# options


def _normalize_domain(domain: str) -> str:
    return domain.strip().strip(".").lower()


@dataclass(frozen=True, slots=True)
class EnrichOptions:
    """Enrichment settings.

    ``internal_domains``: hosts whose referrals count as ``internal`` (subdomains included), in
    addition to the page's own host. ``anonymize_ip``: zero the last IPv4 octet / the last 80 bits
    of an IPv6 address in the output (after the geo lookup). ``geoip``: look up ``country``.
    """

    internal_domains: tuple[str, ...] = ()
    anonymize_ip: bool = False
    geoip: bool = True
    _internal: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        """Normalize ``internal_domains`` (trimmed, outer dots stripped, lower case, empty ones dropped)."""
        normalized = tuple(d for d in (_normalize_domain(d) for d in self.internal_domains) if d)
        object.__setattr__(self, "internal_domains", normalized)
        object.__setattr__(self, "_internal", frozenset(normalized))


DEFAULT_OPTIONS = EnrichOptions()


# --------------------------------------------------------------------------------------------------
# user agent


class UAInfo(NamedTuple):
    """What the enriched event needs from a user-agent string."""

    browser: str
    browser_version: str
    os: str
    device_type: str  # desktop | mobile | tablet | bot | other
    is_bot: bool


_EMPTY_UA = UAInfo("", "", "", "other", False)

_TABLET_DEVICE_FAMILIES = frozenset({"iPad", "Kindle", "Kindle Fire", "Generic Tablet", "Surface Duo"})
_MOBILE_DEVICE_FAMILIES = frozenset({"iPhone", "iPod", "Generic Smartphone", "Generic Feature Phone"})
_MOBILE_OS = frozenset({
    "iOS", "Windows Phone", "Windows Mobile", "Windows CE", "BlackBerry OS", "KaiOS", "Firefox OS",
    "Symbian OS", "Symbian^3", "Tizen", "Sailfish", "webOS", "Bada", "MeeGo", "Maemo", "Ubuntu Touch",
})  # fmt: skip
_TABLET_OS = frozenset({"BlackBerry Tablet OS", "iPadOS"})
_ANDROID_OS = frozenset({"Android", "Fire OS", "HarmonyOS"})
_DESKTOP_OS = frozenset({
    "Windows", "Mac OS X", "macOS", "Linux", "Ubuntu", "Kubuntu", "Xubuntu", "Debian", "Fedora", "Red Hat",
    "CentOS", "SUSE", "openSUSE", "Mint", "Linux Mint", "Arch Linux", "Gentoo", "Mageia", "Mandriva",
    "Slackware", "Chrome OS", "ChromeOS", "FreeBSD", "OpenBSD", "NetBSD", "Solaris", "SunOS",
    "Windows XP", "Windows Vista", "Windows 7", "Windows 8", "Windows 8.1", "Windows 10", "Windows 11",
})  # fmt: skip
_SPIDER = "Spider"
# TVs, consoles' TV apps, cast devices: not desktop/mobile/tablet -> "other"
_TV_MARKERS = (
    "SMART-TV",
    "SmartTV",
    "Smart-TV",
    "SMART TV",
    "HbbTV",
    "GoogleTV",
    "Google TV",
    "AppleTV",
    "CrKey",
    "BRAVIA",
    "; AFT",
    " TV Safari",
    "Web0S",
    "WebOS TV",
    "Roku",
)

_crawler_detect: CrawlerDetect | None = None


def _crawler() -> CrawlerDetect:
    global _crawler_detect
    if _crawler_detect is None:
        _crawler_detect = CrawlerDetect()
    return _crawler_detect


def _version(major: str | None, minor: str | None) -> str:
    if not major:
        return ""
    return f"{major}.{minor}" if minor else major


def _device_type(
    ua: str, ua_family: str, os_family: str, dev_family: str, dev_brand: str, dev_model: str
) -> str:
    if "TV" in dev_family or any(marker in ua for marker in _TV_MARKERS):
        return "other"
    if (
        dev_family in _TABLET_DEVICE_FAMILIES
        or "Tablet" in dev_brand
        or "Tablet" in dev_family
        or "Kindle" in dev_family
        or dev_model.startswith("iPad")
        or os_family in _TABLET_OS
    ):
        return "tablet"
    if os_family in _ANDROID_OS:
        # Android phones say "Mobile"; tablets (Chrome, Silk, Firefox "Tablet;") do not
        return "mobile" if "Mobile" in ua and "Tablet" not in ua else "tablet"
    if dev_family in _MOBILE_DEVICE_FAMILIES or os_family in _MOBILE_OS or "Mobile" in ua_family:
        return "mobile"
    if "Tablet" in ua:
        return "tablet"
    if "Mobi" in ua:
        return "mobile"
    if os_family in _DESKTOP_OS or dev_family == "Mac" or os_family.startswith(("Windows", "Mac")):
        return "desktop"
    return "other"


@functools.lru_cache(maxsize=_UA_CACHE_SIZE)
def ua_info(ua: str) -> UAInfo:
    """Parse a user-agent string (cached per string).

    ``browser``: ua-parser family (e.g. ``Chrome``, ``Mobile Safari``, ``Samsung Internet``);
    ``browser_version``: ``major.minor`` (or ``major``); ``os``: OS family; ``device_type``: one of
    desktop, mobile, tablet, bot, other; ``is_bot``: crawlerdetect match or ua-parser ``Spider``.
    """
    if not ua or not ua.strip():
        return _EMPTY_UA
    result = ua_parser.parse(ua)
    agent, os_, device = result.user_agent, result.os, result.device
    browser = agent.family if agent else ""
    version = _version(agent.major, agent.minor) if agent else ""
    os_family = os_.family if os_ else ""
    dev_family = device.family if device else ""
    dev_brand = (device.brand or "") if device else ""
    dev_model = (device.model or "") if device else ""
    is_bot = dev_family == _SPIDER or _crawler().is_crawler(ua)
    if browser == "Other":
        browser = ""
    if os_family == "Other":
        os_family = ""
    if is_bot:
        device_type = "bot"
    else:
        device_type = _device_type(ua, browser, os_family, dev_family, dev_brand, dev_model)
    return UAInfo(browser, version, os_family, device_type, is_bot)


# --------------------------------------------------------------------------------------------------
# IP: geo lookup and anonymisation

_GEO_DATA_FILE = "geoip2fast-ipv6.dat.gz"  # country data for IPv4 and IPv6
_geo_lock = threading.Lock()
_geo: Any = None
_geo_failed = False


def _geo_db() -> Any:
    """Load the geoip2fast database once (about 0.2 s). geoip2fast keeps its tables in module
    globals, so one process must only ever load one data file."""
    global _geo, _geo_failed
    if _geo is not None or _geo_failed:
        return _geo
    with _geo_lock:
        if _geo is None and not _geo_failed:
            try:
                from geoip2fast import GeoIP2Fast

                data_file = resources.files("geoip2fast").joinpath(_GEO_DATA_FILE)
                with resources.as_file(data_file) as path:
                    _geo = GeoIP2Fast(geoip2fast_data_file=str(path))
            except Exception:
                log.exception("could not load the geoip2fast database; country will be empty")
                _geo_failed = True
    return _geo


def _strip_mapped(ip: str) -> str:
    # IPv4-mapped IPv6 (::ffff:1.2.3.4) -> 1.2.3.4
    if ip[:7].lower() == "::ffff:" and "." in ip:
        return ip[7:]
    return ip


@functools.lru_cache(maxsize=_IP_CACHE_SIZE)
def country_of(ip: str) -> str:
    """ISO 3166-1 alpha-2 country of an IP (geoip2fast, offline), ``""`` for private, reserved,
    unknown or invalid addresses. Cached per IP."""
    if not ip:
        return ""
    db = _geo_db()
    if db is None:
        return ""
    try:
        code = db.lookup(_strip_mapped(ip.strip())).country_code
    except Exception:
        return ""
    if isinstance(code, str) and len(code) == 2 and code.isalpha() and code.isupper():
        return code
    return ""


@functools.lru_cache(maxsize=_IP_CACHE_SIZE)
def anonymize_ip(ip: str) -> str:
    """Zero the last octet of an IPv4 address or the last 80 bits of an IPv6 address.

    Returns ``""`` for values that are not IP addresses (never leaks an unparsed value).
    """
    try:
        addr = ipaddress.ip_address(_strip_mapped(ip.strip()))
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Address(int(addr) & 0xFFFFFF00))
    return str(ipaddress.IPv6Address((int(addr) >> 80) << 80))


# --------------------------------------------------------------------------------------------------
# URLs, UTM parameters, click ids


class UrlInfo(NamedTuple):
    """Parts of the page URL the enriched event needs."""

    host: str
    path: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    click_id_type: str


_EMPTY_URL = UrlInfo("", "", "", "", "", "", "", "")
_UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
#: Click-id query parameters in priority order, with the ad platform they identify.
CLICK_IDS: tuple[tuple[str, str], ...] = (
    ("gclid", "google"),
    ("gbraid", "google"),
    ("wbraid", "google"),
    ("fbclid", "facebook"),
    ("msclkid", "microsoft"),
    ("ttclid", "tiktok"),
    ("twclid", "twitter"),
    ("li_fat_id", "linkedin"),
    ("dclid", "google"),
    ("yclid", "yandex"),
)
_WANTED_PARAMS = frozenset(_UTM_KEYS) | frozenset(k for k, _ in CLICK_IDS)
_NO_PARAMS = ("", "", "", "", "", "")


def _split(url: str) -> SplitResult | None:
    """``urlsplit`` that tolerates garbage and scheme-less URLs ("shop.example/p?x=1")."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        if (
            not parts.netloc
            and (not parts.scheme or "." in parts.scheme)
            and "://" not in url
            and url[0] not in "/?#"
        ):
            head = url.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
            if "." in head and " " not in head:
                parts = urlsplit("//" + url)
        return parts
    except ValueError:
        return None


@functools.lru_cache(maxsize=_HOST_CACHE_SIZE)
def _host_of_netloc(netloc: str) -> str:
    """Lower-case host of a netloc (no userinfo, port, brackets or trailing dot); cached."""
    try:
        host = SplitResult("", netloc, "", "", "").hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".")


def _query_params(query: str) -> tuple[str, str, str, str, str, str]:
    """UTM values and click-id type from a query string.

    Splits on ``&`` like :func:`urllib.parse.parse_qsl` but only unquotes the values of wanted
    keys. Blank values are ignored; for repeated keys the first non-blank value wins.
    """
    if not query or not (
        "utm_" in query or "clid" in query or "braid" in query or "clkid" in query or "li_fat_id" in query
    ):
        return _NO_PARAMS
    found: dict[str, str] = {}
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if value and key in _WANTED_PARAMS and key not in found:
            found[key] = unquote_plus(value) if ("%" in value or "+" in value) else value
    if not found:
        return _NO_PARAMS
    click_id_type = ""
    for key, platform in CLICK_IDS:
        if key in found:
            click_id_type = platform
            break
    get = found.get
    return (
        get("utm_source", ""),
        get("utm_medium", ""),
        get("utm_campaign", ""),
        get("utm_term", ""),
        get("utm_content", ""),
        click_id_type,
    )


@functools.lru_cache(maxsize=_URL_BASE_CACHE_SIZE)
def _host_and_path(base: str) -> tuple[str, str]:
    """Host and path of a URL without query and fragment (cached: pages repeat, queries do not)."""
    parts = _split(base)
    if parts is None:
        return "", ""
    host = _host_of_netloc(parts.netloc) if parts.netloc else ""
    path = parts.path
    if host:
        path = path or "/"
    elif not path.startswith("/"):
        path = ""
    return host, path


def parse_page_url(url: str | None) -> UrlInfo:
    """Split a page URL into host (lower-case, no port), path, UTM fields and click-id type.

    Never raises: garbage yields empty fields. Percent-encoding in the path is kept as sent;
    query values are decoded. Repeated parameters: the first non-empty value wins. Parameters in
    the fragment are ignored.
    """
    if not url or not isinstance(url, str):
        return _EMPTY_URL
    # same split order as urllib.parse.urlsplit: fragment first, then query
    base, _, _fragment = url.strip().partition("#")
    base, _, query = base.partition("?")
    host, path = _host_and_path(base)
    return UrlInfo(host, path, *_query_params(query))


# --------------------------------------------------------------------------------------------------
# referrer classification

#: Hosts (and their subdomains) of webmail clients; checked before search and social.
EMAIL_DOMAINS: frozenset[str] = frozenset({
    "mail.google.com", "inbox.google.com", "com.google.android.gm",
    "outlook.live.com", "outlook.office.com", "outlook.office365.com", "mail.live.com", "hotmail.com",
    "mail.yahoo.com", "mail.yahoo.co.jp", "mail.aol.com", "mail.proton.me", "mail.protonmail.com",
    "mail.yandex.ru", "mail.yandex.com", "mail.zoho.com", "mail.zoho.eu", "e.mail.ru", "fastmail.com",
    "app.fastmail.com", "mail.tutanota.com", "com.microsoft.office.outlook", "com.google.android.gm.lite",
})  # fmt: skip

#: Search-engine hosts (and subdomains).
SEARCH_DOMAINS: frozenset[str] = frozenset({
    "bing.com", "cn.bing.com", "duckduckgo.com", "baidu.com", "m.baidu.com", "ecosia.org", "qwant.com",
    "startpage.com", "search.brave.com", "ask.com", "search.aol.com", "naver.com", "search.naver.com",
    "seznam.cz", "sogou.com", "so.com", "daum.net", "kagi.com", "ya.ru", "yandex.com.tr", "yahoo.co.jp",
    "search.yahoo.com", "perplexity.ai", "you.com", "mojeek.com", "search.lycos.com", "dogpile.com",
    "com.google.android.googlequicksearchbox",
})  # fmt: skip

#: Social network hosts (and subdomains).
SOCIAL_DOMAINS: frozenset[str] = frozenset({
    "facebook.com", "fb.com", "fb.me", "messenger.com", "instagram.com", "threads.net", "threads.com",
    "t.co", "twitter.com", "x.com", "linkedin.com", "lnkd.in", "reddit.com", "redd.it",
    "pinterest.com", "pin.it", "tiktok.com", "youtube.com", "youtu.be", "whatsapp.com", "wa.me",
    "t.me", "telegram.org", "telegram.me", "vk.com", "ok.ru", "snapchat.com", "tumblr.com", "quora.com",
    "discord.com", "discord.gg", "bsky.app", "mastodon.social", "weibo.com", "xing.com", "medium.com",
    "news.ycombinator.com", "line.me", "flipboard.com", "twitch.tv",
    "com.facebook.katana", "com.instagram.android", "com.twitter.android", "com.linkedin.android",
    "com.reddit.frontpage", "com.zhiliaoapp.musically", "com.google.android.youtube",
})  # fmt: skip

#: Brands that run the same service on many country domains (google.de, google.co.uk, yahoo.co.jp).
SEARCH_BRANDS: frozenset[str] = frozenset({"google", "yahoo", "yandex", "bing", "ecosia", "qwant"})
SOCIAL_BRANDS: frozenset[str] = frozenset({"pinterest", "facebook"})
# second-level labels used by country registries (co.uk, com.br, ne.jp, ...)
_SECOND_LEVEL_LABELS = frozenset({"co", "com", "net", "org", "ac", "ne", "or", "go", "gov", "edu", "gob"})
_EMAIL_MEDIUMS = frozenset({"email", "e-mail", "e_mail", "e mail", "newsletter"})


def _suffixes(host: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    yield host
    dot = host.find(".")
    while dot != -1:
        yield host[dot + 1 :]
        dot = host.find(".", dot + 1)


def _brand_tld(labels: list[str], brands: frozenset[str]) -> bool:
    """True when some label is a brand followed only by a (cc)TLD, e.g. www.google.co.uk."""
    for i, label in enumerate(labels):
        if label in brands:
            rest = labels[i + 1 :]
            if len(rest) == 1 and rest[0].isalpha():
                return True
            if len(rest) == 2 and rest[0] in _SECOND_LEVEL_LABELS and len(rest[1]) == 2 and rest[1].isalpha():
                return True
    return False


@functools.lru_cache(maxsize=_HOST_CACHE_SIZE)
def _external_type(host: str) -> str:
    for suffix in _suffixes(host):
        if suffix in EMAIL_DOMAINS:
            return "email"
    for suffix in _suffixes(host):
        if suffix in SEARCH_DOMAINS:
            return "search"
        if suffix in SOCIAL_DOMAINS:
            return "social"
    labels = host.split(".")
    if _brand_tld(labels, SEARCH_BRANDS):
        return "search"
    if _brand_tld(labels, SOCIAL_BRANDS):
        return "social"
    return "other"


def _strip_www(host: str) -> str:
    return host[4:] if host.startswith("www.") else host


def _is_internal(ref_host: str, page_host: str, internal: frozenset[str]) -> bool:
    if page_host:
        ref, page = _strip_www(ref_host), _strip_www(page_host)
        if ref == page or ref.endswith("." + page):
            return True
    if internal:
        return any(suffix in internal for suffix in _suffixes(ref_host))
    return False


@functools.lru_cache(maxsize=_HOST_CACHE_SIZE)
def _referrer_host(referrer: str) -> str:
    parts = _split(referrer.strip())
    if parts is None or not parts.netloc:
        return ""
    return _host_of_netloc(parts.netloc)


def classify_referrer(
    referrer: str | None,
    page_host: str = "",
    utm_medium: str = "",
    options: EnrichOptions = DEFAULT_OPTIONS,
) -> tuple[str, str]:
    """Return ``(referrer_type, referrer_host)``.

    ``referrer_type``: ``internal`` (referrer host is the page host, a subdomain of it, or under
    ``options.internal_domains``), else ``email`` when ``utm_medium`` is email-like, else ``direct``
    (no referrer), else ``email``/``search``/``social`` by the referrer host, else ``other``.
    """
    ref_host = _referrer_host(referrer) if referrer and isinstance(referrer, str) else ""
    if ref_host and _is_internal(ref_host, page_host, options._internal):
        return "internal", ref_host
    if utm_medium and utm_medium.lower() in _EMAIL_MEDIUMS:
        return "email", ref_host
    if not referrer:
        return "direct", ""
    if not ref_host:
        return "other", ""
    return _external_type(ref_host), ref_host


# --------------------------------------------------------------------------------------------------
# the enriched record


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def enrich(event: ValidEvent, user_key: str, options: EnrichOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    """Build the flat enriched record (fields :data:`ENRICHED_FIELDS`) for one valid event."""
    data = event.data
    context = data.get("context") or {}
    page = context.get("page") or {}
    ua = _str(context.get("user_agent"))
    ip = _str(context.get("ip")).strip()
    page_url = _str(page.get("url"))
    referrer = _str(page.get("referrer"))

    agent = ua_info(ua)
    url = parse_page_url(page_url)
    path = url.path if page_url else _str(page.get("path"))
    referrer_type, referrer_host = classify_referrer(referrer, url.host, url.utm_medium, options)
    country = country_of(ip) if options.geoip and ip else ""
    if options.anonymize_ip and ip:
        ip = anonymize_ip(ip)
    event_time_ms = event.event_time_ms
    timestamp = format_ms(event_time_ms)

    return {
        "message_id": data["message_id"],
        "type": data["type"],
        "event": _str_or_none(data.get("event")),
        "anonymous_id": _str_or_none(data.get("anonymous_id")),
        "user_id": _str_or_none(data.get("user_id")),
        "previous_id": _str_or_none(data.get("previous_id")),
        "user_key": user_key,
        "timestamp": timestamp,
        "event_time_ms": event_time_ms,
        "original_timestamp": timestamp
        if event.timestamp_ms == event_time_ms
        else format_ms(event.timestamp_ms),
        "sent_at": format_ms_or_none(event.sent_at_ms),
        "received_at": format_ms(event.received_at_ms),
        "ip": ip,
        "user_agent": ua,
        "page_url": page_url,
        "page_path": path,
        "page_host": url.host,
        "page_title": _str(page.get("title")),
        "referrer": referrer,
        "locale": _str(context.get("locale")),
        "properties": data.get("properties") or {},
        "traits": data.get("traits") or {},
        "browser": agent.browser,
        "browser_version": agent.browser_version,
        "os": agent.os,
        "device_type": agent.device_type,
        "is_bot": agent.is_bot,
        "country": country,
        "utm_source": url.utm_source,
        "utm_medium": url.utm_medium,
        "utm_campaign": url.utm_campaign,
        "utm_term": url.utm_term,
        "utm_content": url.utm_content,
        "click_id_type": url.click_id_type,
        "referrer_type": referrer_type,
        "referrer_host": referrer_host,
    }


def enrich_batch(
    events: Sequence[ValidEvent], user_keys: Sequence[str], options: EnrichOptions = DEFAULT_OPTIONS
) -> list[dict[str, Any]]:
    """:func:`enrich` over aligned sequences (e.g. for a pandas UDF); one record per event, in order."""
    if len(events) != len(user_keys):
        raise ValueError(f"{len(events)} events but {len(user_keys)} user keys")
    return [enrich(ev, key, options) for ev, key in zip(events, user_keys, strict=True)]


def to_json(enriched: dict[str, Any]) -> bytes:
    """Serialise an enriched record as compact JSON (the ``events.enriched`` value)."""
    return orjson.dumps(enriched)


def to_json_batch(records: Sequence[dict[str, Any]]) -> list[bytes]:
    """:func:`to_json` over a batch."""
    dumps = orjson.dumps
    return [dumps(r) for r in records]


def warm_up() -> None:
    """Load the lazy data sets (UA regexes, crawler patterns, geo database) ahead of the first
    event, e.g. from a UDF's ``open()``."""
    ua_info(
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
    )
    _geo_db()

package dev.clickpulse.operators.sessions;

import java.io.IOException;
import java.math.BigDecimal;
import java.time.OffsetDateTime;
import java.time.format.DateTimeFormatter;
import java.time.format.DateTimeFormatterBuilder;
import java.time.format.DateTimeParseException;
import java.time.temporal.ChronoField;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;

/**
 * The parts of an enriched event sessionization needs (``udfs.sessions.Event.from_record``), read in one
 * streaming pass over the JSON bytes: top-level fields sessionization does not use are skipped without
 * being built, ``properties`` is only looked into for ``revenue`` and ``currency``.
 */
public final class SessionEvent {
    static final String ORDER_COMPLETED = "Order Completed";
    private static final long MICROS = 1_000_000L;
    /** 9999-12-31T23:59:59.999Z, the largest epoch-ms ``timestamp`` accepted (``udfs.timeutil``). */
    public static final long MAX_EPOCH_MS = 253402300799999L;

    final String messageId;
    final String userKey;
    final long tsMs;
    final boolean isPage;
    final boolean isOrder;
    final long revenueMicros;
    final String currency;
    final Touch touch;
    final Touch exitMark;

    private SessionEvent(String messageId, String userKey, long tsMs, boolean isPage, boolean isOrder,
            long revenueMicros, String currency, Touch touch) {
        this.messageId = messageId;
        this.userKey = userKey;
        this.tsMs = tsMs;
        this.isPage = isPage;
        this.isOrder = isOrder;
        this.revenueMicros = revenueMicros;
        this.currency = currency;
        this.touch = touch;
        this.exitMark = touch.exitMark();
    }

    public String messageId() {
        return messageId;
    }

    public String userKey() {
        return userKey;
    }

    public long tsMs() {
        return tsMs;
    }

    /** A JSON value as far as sessionization cares: its kind and, for scalars, its text / number. */
    private static final class Value {
        JsonToken token;
        String text;
        Number number;
        boolean nonEmptyContainer;

        boolean isString() {
            return token == JsonToken.VALUE_STRING;
        }

        /** Python's ``bool(value)``. */
        boolean truthy() {
            if (token == null) {
                return false;
            }
            switch (token) {
                case VALUE_STRING:
                    return !text.isEmpty();
                case VALUE_TRUE:
                    return true;
                case VALUE_NUMBER_INT:
                case VALUE_NUMBER_FLOAT:
                    return number.doubleValue() != 0.0;
                case START_OBJECT:
                case START_ARRAY:
                    return nonEmptyContainer;
                default:
                    return false;
            }
        }

        /** ``_opt_str``: a non-empty string, else null. */
        String optStr() {
            return isString() && !text.isEmpty() ? text : null;
        }
    }

    private static Value read(JsonParser p) throws IOException {
        Value v = new Value();
        JsonToken t = p.currentToken();
        v.token = t;
        if (t == JsonToken.VALUE_STRING) {
            v.text = p.getText();
        } else if (t == JsonToken.VALUE_NUMBER_INT || t == JsonToken.VALUE_NUMBER_FLOAT) {
            v.number = p.getNumberValue();
        } else if (t == JsonToken.START_OBJECT || t == JsonToken.START_ARRAY) {
            JsonToken next = p.nextToken();
            v.nonEmptyContainer = next != JsonToken.END_OBJECT && next != JsonToken.END_ARRAY;
            if (v.nonEmptyContainer) {
                // inside the container at its first element: skip to the container's end
                JsonToken x = next;
                while (x != JsonToken.END_OBJECT && x != JsonToken.END_ARRAY) {
                    if (x == null) {
                        throw new IOException("unexpected end of input");
                    }
                    if (x == JsonToken.START_OBJECT || x == JsonToken.START_ARRAY) {
                        p.skipChildren();
                    }
                    x = p.nextToken();
                }
            }
        }
        return v;
    }

    /** Parse an enriched event's JSON (``event_time_ms``, else ISO-8601 or epoch-ms ``timestamp``). */
    public static SessionEvent parse(JsonFactory json, byte[] raw) throws MalformedEventException {
        Value messageId = null;
        Value userKey = null;
        Value eventTimeMs = null;
        Value timestamp = null;
        Value type = null;
        Value event = null;
        Value revenue = null;
        Value currency = null;
        boolean propsIsObject = false;
        Value pageUrl = null;
        Value pagePath = null;
        Value anonymousId = null;
        Value utmSource = null;
        Value utmMedium = null;
        Value utmCampaign = null;
        Value utmTerm = null;
        Value utmContent = null;
        Value referrerType = null;
        Value country = null;
        Value deviceType = null;
        try (JsonParser p = json.createParser(raw)) {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                throw new MalformedEventException("enriched event is not a JSON object");
            }
            while (p.nextToken() == JsonToken.FIELD_NAME) {
                String name = p.currentName();
                p.nextToken();
                switch (name) {
                    case "properties":
                        // the last "properties" wins, as in a dict: forget what an earlier one had
                        revenue = null;
                        currency = null;
                        propsIsObject = p.currentToken() == JsonToken.START_OBJECT;
                        if (propsIsObject) {
                            while (p.nextToken() == JsonToken.FIELD_NAME) {
                                String prop = p.currentName();
                                p.nextToken();
                                if (prop.equals("revenue")) {
                                    revenue = read(p);
                                } else if (prop.equals("currency")) {
                                    currency = read(p);
                                } else {
                                    p.skipChildren();
                                }
                            }
                        } else {
                            read(p);
                        }
                        break;
                    case "message_id": messageId = read(p); break;
                    case "user_key": userKey = read(p); break;
                    case "event_time_ms": eventTimeMs = read(p); break;
                    case "timestamp": timestamp = read(p); break;
                    case "type": type = read(p); break;
                    case "event": event = read(p); break;
                    case "page_url": pageUrl = read(p); break;
                    case "page_path": pagePath = read(p); break;
                    case "anonymous_id": anonymousId = read(p); break;
                    case "utm_source": utmSource = read(p); break;
                    case "utm_medium": utmMedium = read(p); break;
                    case "utm_campaign": utmCampaign = read(p); break;
                    case "utm_term": utmTerm = read(p); break;
                    case "utm_content": utmContent = read(p); break;
                    case "referrer_type": referrerType = read(p); break;
                    case "country": country = read(p); break;
                    case "device_type": deviceType = read(p); break;
                    default: p.skipChildren();
                }
            }
            if (p.currentToken() != JsonToken.END_OBJECT || p.nextToken() != null) {
                throw new MalformedEventException("trailing data after the JSON object");
            }
        } catch (IOException e) {
            throw new MalformedEventException("not JSON: " + e.getMessage());
        }

        if (messageId == null || messageId.optStr() == null) {
            throw new MalformedEventException("enriched event without message_id");
        }
        String mid = messageId.text;
        if (userKey == null || userKey.optStr() == null) {
            throw new MalformedEventException("enriched event " + mid + " without user_key");
        }
        long ts;
        if (eventTimeMs != null && eventTimeMs.token == JsonToken.VALUE_NUMBER_INT
                && (eventTimeMs.number instanceof Long || eventTimeMs.number instanceof Integer)) {
            ts = eventTimeMs.number.longValue();
        } else {
            ts = timestampMs(mid, timestamp);
        }

        String kind = type != null && type.isString() ? type.text : null;
        boolean isOrder = "track".equals(kind) && event != null && event.isString()
                && ORDER_COMPLETED.equals(event.text);
        long revenueMicros = 0;
        String cur = null;
        if (isOrder && propsIsObject) {
            if (revenue != null && revenue.number != null) {
                revenueMicros = micros(revenue.number);
            }
            cur = currency != null ? currency.optStr() : null;
        }
        boolean hasPage = pageUrl != null && pageUrl.truthy();
        Touch touch = new Touch(
                hasPage ? 1 : 0,
                ts,
                mid,
                hasPage && pagePath != null ? pagePath.optStr() : null,
                opt(anonymousId),
                opt(utmSource),
                opt(utmMedium),
                opt(utmCampaign),
                opt(utmTerm),
                opt(utmContent),
                opt(referrerType),
                opt(country),
                opt(deviceType));
        return new SessionEvent(mid, userKey.text, ts, "page".equals(kind), isOrder, revenueMicros, cur, touch);
    }

    private static String opt(Value v) {
        return v == null ? null : v.optStr();
    }

    /** ``round(revenue * 1_000_000)``: exact for integers, round-half-even of the double product else. */
    private static long micros(Number n) {
        if (n instanceof Double || n instanceof Float || n instanceof BigDecimal) {
            return (long) Math.rint(n.doubleValue() * MICROS);
        }
        return Math.multiplyExact(n.longValue(), MICROS);
    }

    private static long timestampMs(String mid, Value v) throws MalformedEventException {
        String prefix = "enriched event " + mid + ": timestamp: ";
        if (v == null || v.token == JsonToken.VALUE_NULL) {
            throw new MalformedEventException(prefix + "timestamp must be an ISO-8601 string or epoch ms");
        }
        if (v.isString()) {
            try {
                return parseIso8601Ms(v.text);
            } catch (DateTimeParseException | ArithmeticException e) {
                throw new MalformedEventException(prefix + "not an ISO-8601 date-time: " + v.text);
            }
        }
        long ms;
        if (v.token == JsonToken.VALUE_NUMBER_INT) {
            if (!(v.number instanceof Long || v.number instanceof Integer)) {
                throw new MalformedEventException(prefix + "epoch ms out of range");
            }
            ms = v.number.longValue();
        } else if (v.token == JsonToken.VALUE_NUMBER_FLOAT) {
            double d = v.number.doubleValue();
            if (!Double.isFinite(d)) {
                throw new MalformedEventException(prefix + "non-finite timestamp");
            }
            ms = (long) Math.floor(d);
        } else {
            throw new MalformedEventException(prefix + "timestamp must be an ISO-8601 string or epoch ms");
        }
        if (ms < 0 || ms > MAX_EPOCH_MS) {
            throw new MalformedEventException(prefix + "epoch ms out of range");
        }
        return ms;
    }

    /** RFC 3339 date-times (``T`` or space, any fraction, ``Z`` or an offset); sub-ms digits floored. */
    private static final DateTimeFormatter ISO = new DateTimeFormatterBuilder()
            .parseCaseInsensitive()
            .append(DateTimeFormatter.ISO_LOCAL_DATE)
            .optionalStart().appendLiteral('T').optionalEnd()
            .optionalStart().appendLiteral(' ').optionalEnd()
            .appendValue(ChronoField.HOUR_OF_DAY, 2).appendLiteral(':')
            .appendValue(ChronoField.MINUTE_OF_HOUR, 2)
            .optionalStart().appendLiteral(':').appendValue(ChronoField.SECOND_OF_MINUTE, 2)
            .optionalStart().appendFraction(ChronoField.NANO_OF_SECOND, 0, 9, true).optionalEnd()
            .optionalEnd()
            .appendOffset("+HH:MM", "Z")
            .toFormatter();

    public static long parseIso8601Ms(String value) {
        OffsetDateTime t = OffsetDateTime.parse(value, ISO);
        long seconds = t.toEpochSecond();
        return Math.addExact(Math.multiplyExact(seconds, 1000L), t.getNano() / 1_000_000);
    }
}

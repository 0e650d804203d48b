package dev.clickpulse.operators.triggers;

import dev.clickpulse.operators.sessions.SessionEvent;
import java.math.BigInteger;
import java.time.format.DateTimeParseException;
import java.util.Map;

/**
 * {@code udfs.rules.evaluate.Event}: what rule evaluation reads of an enriched event (message id, name,
 * type, user key, event time) and the whole flat record for paths. The header is read as
 * {@code udfs.event.EventHeader.from_record} reads it; {@link Malformed} carries the same messages.
 */
final class TriggerEvent {
    final String messageId;
    final String name;
    final String type;
    final String userKey;
    final long tsMs;
    final Map<String, Object> record;

    private TriggerEvent(String messageId, String name, String type, String userKey, long tsMs,
            Map<String, Object> record) {
        this.messageId = messageId;
        this.name = name;
        this.type = type;
        this.userKey = userKey;
        this.tsMs = tsMs;
        this.record = record;
    }

    /** An enriched record without what keyed logic needs. */
    static final class Malformed extends Exception {
        private static final long serialVersionUID = 1L;

        Malformed(String message) {
            super(message);
        }
    }

    static TriggerEvent of(Map<String, Object> record) throws Malformed {
        Object mid = record.get("message_id");
        Object user = record.get("user_key");
        if (!(mid instanceof String) || ((String) mid).isEmpty()) {
            throw new Malformed("enriched event without message_id");
        }
        if (!(user instanceof String) || ((String) user).isEmpty()) {
            throw new Malformed("enriched event " + mid + " without user_key");
        }
        Object fast = record.get("event_time_ms");
        long ts = fast instanceof Long ? (Long) fast
                : fast instanceof BigInteger ? timestampMs((String) mid, fast)
                : timestampMs((String) mid, record.get("timestamp"));
        Object name = record.get("event");
        Object type = record.get("type");
        return new TriggerEvent((String) mid, name instanceof String ? (String) name : null,
                type instanceof String ? (String) type : null, (String) user, ts, record);
    }

    /** {@code udfs.timeutil.parse_timestamp_ms}. */
    private static long timestampMs(String mid, Object v) throws Malformed {
        String prefix = "enriched event " + mid + ": timestamp: ";
        long ms;
        if (v instanceof String) {
            try {
                return SessionEvent.parseIso8601Ms((String) v);
            } catch (DateTimeParseException | ArithmeticException e) {
                throw new Malformed(prefix + "not an ISO-8601 date-time: " + v);
            }
        } else if (v instanceof Long) {
            ms = (Long) v;
        } else if (v instanceof Json.Decimal) {
            double d = ((Json.Decimal) v).value;
            if (!Double.isFinite(d)) {
                throw new Malformed(prefix + "non-finite timestamp");
            }
            ms = (long) Math.floor(d);
        } else if (v instanceof BigInteger) {
            throw new Malformed(prefix + "epoch ms out of range");
        } else {
            throw new Malformed(prefix + "timestamp must be an ISO-8601 string or epoch ms");
        }
        if (ms < 0 || ms > SessionEvent.MAX_EPOCH_MS) {
            throw new Malformed(prefix + "epoch ms out of range");
        }
        return ms;
    }
}

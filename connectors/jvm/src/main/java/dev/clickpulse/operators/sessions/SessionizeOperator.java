package dev.clickpulse.operators.sessions;

import java.io.IOException;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.types.Row;

/**
 * Entry points PyFlink calls through its gateway (``jobs/sessionize.py``, engine ``jvm``): key a
 * ``(k, v)`` stream by user_key and apply {@link SessionizeFunction}; the late events are the result's
 * side output {@link #lateEvents}.
 */
public final class SessionizeOperator {
    private SessionizeOperator() {}

    /** The user_key: the Kafka key ``k``, else the JSON's ``user_key``, else ``""``. */
    public static final class UserKey implements KeySelector<Row, String> {
        private static final long serialVersionUID = 1L;
        private transient JsonFactory json;

        @Override
        public String getKey(Row row) {
            Object k = SessionizeFunction.field(row, 0, "k");
            if (k != null) {
                return (String) k;
            }
            if (json == null) {
                json = new JsonFactory();
            }
            return userKeyOf(json, (byte[]) SessionizeFunction.field(row, 1, "v"));
        }
    }

    static String userKeyOf(JsonFactory json, byte[] raw) {
        if (raw == null) {
            return "";
        }
        try (JsonParser p = json.createParser(raw)) {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                return "";
            }
            String found = "";
            while (p.nextToken() == JsonToken.FIELD_NAME) {
                String name = p.currentName();
                JsonToken t = p.nextToken();
                if (name.equals("user_key") && t.isScalarValue() && t != JsonToken.VALUE_NULL) {
                    found = p.getText();
                } else {
                    p.skipChildren();
                }
            }
            return found;
        } catch (IOException e) {
            return "";
        }
    }

    /** ``events`` (rows ``k``, ``v``) keyed by user_key into the sessions operator, with ``uid`` and ``name``. */
    public static SingleOutputStreamOperator<Row> apply(
            DataStream<Row> events,
            long gapMs,
            long maxMs,
            long allowedLatenessMs,
            long outOfOrdernessMs,
            String stateName,
            long stateTtlMs,
            String label,
            long logIntervalMs,
            String uid,
            String name) {
        SessionConfig cfg = new SessionConfig(gapMs, maxMs, allowedLatenessMs, outOfOrdernessMs);
        return events.keyBy(new UserKey(), Types.STRING)
                .process(new SessionizeFunction(cfg, stateName, stateTtlMs, label, logIntervalMs),
                        SessionizeFunction.ROW_TYPE)
                .uid(uid)
                .name(name);
    }

    /** The too-late (and malformed) events of an operator made by {@link #apply}. */
    public static DataStream<Row> lateEvents(SingleOutputStreamOperator<Row> sessions) {
        return sessions.getSideOutput(SessionizeFunction.LATE);
    }
}

package dev.clickpulse.operators.triggers;

import java.util.Map;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.streaming.api.datastream.BroadcastStream;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.types.Row;

/**
 * Entry point PyFlink calls through its gateway (``jobs/triggers.py``, engine ``jvm``): key the enriched
 * ``(k, v)`` rows by ``k``, broadcast the compiled rule records and apply {@link TriggersFunction}.
 */
public final class TriggersOperator {
    private TriggersOperator() {}

    /** The user_key column ``k`` (``""`` when null). */
    public static final class UserKey implements KeySelector<Row, String> {
        private static final long serialVersionUID = 1L;

        @Override
        public String getKey(Row row) {
            Object k = TriggersFunction.field(row, 0, "k");
            return k == null ? "" : (String) k;
        }
    }

    /**
     * @param events rows ``(k STRING user_key, v BYTES enriched event JSON)`` with event-time timestamps
     * @param ruleRecords rows ``(k STRING rule id, v STRING compile_rule_record text)``
     * @param configJson ``{"file_rules": [compiled rule], "snapshot": {rule id: [partition, offset, rule, error]},
     *     "event_filter": [names] | null, "state_ttl_ms", "label", "log_interval_ms"}`` (``jobs.triggers.jvm_config_json``)
     * @return rows ``(k STRING user_key, v BYTES action JSON)``
     */
    public static SingleOutputStreamOperator<Row> apply(
            DataStream<Row> events,
            DataStream<Row> ruleRecords,
            String configJson,
            String userStateName,
            String rulesStateName,
            String uid,
            String name) throws Json.ParseError {
        Map<?, ?> config = (Map<?, ?>) Json.parse(new JsonFactory(), configJson);
        long stateTtlMs = number(config.get("state_ttl_ms"), 0);
        long logIntervalMs = number(config.get("log_interval_ms"), 60_000);
        Object label = config.get("label");
        MapStateDescriptor<String, String> rules = new MapStateDescriptor<>(rulesStateName, Types.STRING, Types.STRING);
        BroadcastStream<Row> broadcast = ruleRecords.broadcast(rules);
        return events.keyBy(new UserKey(), Types.STRING)
                .connect(broadcast)
                .process(new TriggersFunction(configJson, userStateName, rules, stateTtlMs,
                        label == null ? "triggers" : (String) label, logIntervalMs),
                        TriggersFunction.ROW_TYPE)
                .uid(uid)
                .name(name);
    }

    private static long number(Object v, long fallback) {
        return v instanceof Number ? ((Number) v).longValue() : fallback;
    }
}

package dev.clickpulse.operators.triggers;

import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * What {@code jobs.triggers.TriggerFunction} does around the reducer, without Flink: the rule book (the
 * {@code --rules} file overlaid by {@code rules} topic records, "newest offset wins", an invalid record
 * leaves no rule, the optional event-name pre-filter), the skip of events no rule uses, malformed records,
 * state load/store, timers and counters. {@link TriggersFunction} runs it in Flink, {@link TriggerReplay}
 * on recorded histories for the differential test.
 */
final class TriggerLogic {
    private static final Logger LOG = LoggerFactory.getLogger(TriggerLogic.class);

    /** Counter names, in the order of {@code jobs.triggers.COUNTERS}. */
    static final String[] COUNTERS = {
        "events", "skipped", "malformed", "evaluations", "fires", "suppressed", "timers_fired",
        "rule_updates", "rules_loaded", "rules_invalid", "rules_outside_filter",
    };
    static final int EVENTS = 0;
    static final int SKIPPED = 1;
    static final int MALFORMED = 2;
    static final int EVALUATIONS = 3;
    static final int FIRES = 4;
    static final int SUPPRESSED = 5;
    static final int TIMERS_FIRED = 6;
    static final int RULE_UPDATES = 7;
    static final int RULES_LOADED = 8;
    static final int RULES_INVALID = 9;
    static final int RULES_OUTSIDE_FILTER = 10;
    /** Counters about the broadcast rules: the same on every subtask (reported by subtask 0 only). */
    static final Set<String> RULE_COUNTERS =
            Set.of("rule_updates", "rules_loaded", "rules_invalid", "rules_outside_filter");

    /** The keyed state of the current key. */
    interface Store {
        byte[] get() throws Exception;

        void put(byte[] value) throws Exception;

        void clear() throws Exception;
    }

    /** Where timers and actions go. */
    interface Sink {
        void timer(long at) throws Exception;

        void action(String userKey, Map<String, Object> action) throws Exception;
    }

    /** One {@code rules} topic record after {@code compile_rule_record}: {@code [partition, offset, rule, error]}. */
    static final class Record {
        final int partition;
        final long offset;
        final Object rule;
        final String error;
        final String text;

        Record(int partition, long offset, Object rule, String error, String text) {
            this.partition = partition;
            this.offset = offset;
            this.rule = rule;
            this.error = error;
            this.text = text;
        }

        static Record parse(JsonFactory json, String text) throws Json.ParseError {
            List<?> l = (List<?>) Json.parse(json, text);
            return new Record(((Number) l.get(0)).intValue(), ((Number) l.get(1)).longValue(), l.get(2),
                    (String) l.get(3), text);
        }

        static Record of(JsonFactory json, Object parsed) {
            List<?> l = (List<?>) parsed;
            return new Record(((Number) l.get(0)).intValue(), ((Number) l.get(1)).longValue(), l.get(2),
                    (String) l.get(3), Json.dumps(parsed));
        }

        /** {@code newer}: a higher offset in the same partition, or any record of another partition. */
        boolean newerThan(Record current) {
            return current == null || partition != current.partition || offset > current.offset;
        }

        /** The same topic record (a partition and offset name one record). */
        boolean sameAs(Record other) {
            return other != null && partition == other.partition && offset == other.offset;
        }
    }

    private final JsonFactory json;
    private final List<Object> fileRules;
    private final Set<String> eventFilter;
    private final LinkedHashMap<String, Record> records = new LinkedHashMap<>();
    private Map<String, String> errors = new HashMap<>();
    private final Set<String> refused = new HashSet<>();
    private RuleSet rules = RuleSet.none();
    final long[] totals = new long[COUNTERS.length];
    private boolean restored;

    /**
     * @param config {@code {"file_rules": [compiled], "snapshot": {id: [p, o, rule, error]}, "event_filter": [names] | null}}
     */
    @SuppressWarnings("unchecked")
    TriggerLogic(JsonFactory json, Map<String, Object> config) {
        this.json = json;
        this.fileRules = (List<Object>) config.getOrDefault("file_rules", List.of());
        Object filter = config.get("event_filter");
        this.eventFilter = filter == null ? null : RuleSet.setOf((List<String>) filter);
        Object snapshot = config.get("snapshot");
        if (snapshot != null) {
            for (Map.Entry<String, Object> e : ((Map<String, Object>) snapshot).entrySet()) {
                records.put(e.getKey(), Record.of(json, e.getValue()));
            }
        }
        refresh();
    }

    // ------------------------------------------------------------------------------------------ rules

    /** {@code _refresh}: the rules in force from the file rules and the records; counts what changed. */
    private void refresh() {
        LinkedHashMap<String, Object> byId = new LinkedHashMap<>();
        for (Object c : fileRules) {
            byId.put((String) ((Map<?, ?>) c).get("id"), c);
        }
        Map<String, String> found = new LinkedHashMap<>();
        for (Map.Entry<String, Record> e : records.entrySet()) {
            Record r = e.getValue();
            if (r.error != null) {
                found.put(e.getKey(), r.error);
                byId.remove(e.getKey());
            } else if (r.rule == null) {
                byId.remove(e.getKey());
            } else {
                byId.put(e.getKey(), r.rule);
            }
        }
        for (Map.Entry<String, String> e : found.entrySet()) {
            if (!e.getValue().equals(errors.get(e.getKey()))) {
                LOG.error("rule {} refused: {}", e.getKey(), e.getValue());
                totals[RULES_INVALID]++;
            }
        }
        errors = found;
        LinkedHashMap<String, TriggerRule> kept = new LinkedHashMap<>();
        for (Map.Entry<String, Object> e : byId.entrySet()) {
            TriggerRule rule = TriggerRule.of(e.getValue());
            if (eventFilter != null && rule.enabled && (rule.events == null || !eventFilter.containsAll(rule.events))) {
                if (refused.add(rule.id)) {
                    LOG.error("rule {} uses events outside the job's pre-filter {}: not evaluated (restart the job "
                            + "with a wider CLICKPULSE_TRIGGERS_EVENT_FILTER)", rule.id, eventFilter);
                    totals[RULES_OUTSIDE_FILTER]++;
                }
                continue;
            }
            kept.put(e.getKey(), rule);
        }
        rules = new RuleSet(kept);
        totals[RULES_LOADED] = rules.size();
    }

    boolean restored() {
        return restored;
    }

    /** {@code _restore}: once per subtask, merge the records kept in broadcast state (from a checkpoint). */
    void restore(Iterable<Map.Entry<String, String>> broadcast) throws Json.ParseError {
        restored = true;
        boolean changed = false;
        for (Map.Entry<String, String> e : broadcast) {
            Record rec = Record.parse(json, e.getValue());
            if (rec.newerThan(records.get(e.getKey()))) {
                records.put(e.getKey(), rec);
                changed = true;
            }
        }
        if (changed) {
            refresh();
        }
    }

    /**
     * {@code process_broadcast_element}: one rules topic record; returns the text to keep in broadcast state
     * under the rule id, or {@code null} for an older version replayed from the start of the topic.
     */
    String onRuleRecord(String ruleId, String text, boolean log) throws Json.ParseError {
        Record rec = Record.parse(json, text);
        Record current = records.get(ruleId);
        if (current != null && !rec.newerThan(current) && !rec.sameAs(current)) {
            return null;
        }
        if (!rec.sameAs(current)) {
            records.put(ruleId, rec);
            totals[RULE_UPDATES]++;
            refresh();
            if (log) {
                LOG.info("rule {} {}", ruleId, rec.rule == null && rec.error == null ? "removed" : "updated");
            }
        }
        return text;
    }

    // ------------------------------------------------------------------------------ events and timers

    /** {@code process_element}: one enriched event (JSON bytes) of the current key. */
    @SuppressWarnings("unchecked")
    void onEvent(byte[] raw, Store store, Sink sink, long nowMs) throws Exception {
        totals[EVENTS]++;
        TriggerEvent ev;
        try {
            Object doc = Json.parse(json, raw);
            if (!(doc instanceof Map)) {
                throw new TriggerEvent.Malformed("enriched event is not a JSON object");
            }
            Map<String, Object> record = (Map<String, Object>) doc;
            if (rules.relevant != null) {
                Object name = record.get("event");
                if (name instanceof Map || name instanceof List) {
                    throw new TriggerEvent.Malformed("event name is not hashable");
                }
                if (!(name instanceof String) || !rules.relevant.contains(name)) {
                    totals[SKIPPED]++; // no rule can use it: no state access at all
                    return;
                }
            }
            ev = TriggerEvent.of(record);
        } catch (Json.ParseError | TriggerEvent.Malformed e) {
            LOG.warn("malformed enriched event: {}", e.getMessage());
            totals[MALFORMED]++;
            return;
        }
        byte[] before = store.get();
        TriggerState state = TriggerState.decode(before);
        TriggerReducer.Result res = TriggerReducer.step(state, ev, rules, nowMs, json);
        totals[EVALUATIONS] += rules.active().size();
        apply(before, res, store, sink);
    }

    /** {@code on_timer}: the watermark passed a deadline or clean-up time of the current key. */
    void onTimer(long timestamp, Store store, Sink sink, long nowMs) throws Exception {
        totals[TIMERS_FIRED]++;
        byte[] before = store.get();
        if (before == null || before.length == 0) {
            return;
        }
        TriggerReducer.Result res = TriggerReducer.onTimer(TriggerState.decode(before), timestamp, rules, nowMs);
        apply(before, res, store, sink);
    }

    private void apply(byte[] before, TriggerReducer.Result res, Store store, Sink sink) throws Exception {
        totals[SUPPRESSED] += res.suppressed;
        byte[] after = res.state.encode();
        if (after == null) {
            if (before != null && before.length > 0) {
                store.clear();
            }
        } else if (before == null || !java.util.Arrays.equals(before, after)) {
            store.put(after);
        }
        for (long t : res.timers) {
            sink.timer(t);
        }
        totals[FIRES] += res.fires.size();
        for (TriggerReducer.Fire f : res.fires) {
            sink.action(f.userKey, f.toAction());
        }
    }
}

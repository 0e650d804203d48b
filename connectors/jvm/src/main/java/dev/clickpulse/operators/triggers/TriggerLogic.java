package dev.clickpulse.operators.triggers;

import static dev.clickpulse.operators.triggers.TriggerState.NONE;

import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * What {@code jobs.triggers.TriggerFunction} does around the reducer, without Flink: the rule book (the
 * {@code --rules} file overlaid by {@code rules} topic records, "newest offset wins", an invalid record
 * leaves no rule, the optional event-name pre-filter), the skip of events no rule uses, malformed records,
 * state load/store, timers and counters. {@link TriggersFunction} runs it in Flink, {@link TriggerReplay}
 * on recorded histories for the differential test.
 *
 * <p><b>One wake-up timer per key.</b> The reducer asks for a timer per deadline and clean-up time, and a
 * busy user adds one per active minute ({@code remember_for} clean-ups of {@code returning} rules, window
 * ends of counts): a bench history left ~5 pending timers per key, and Flink writes every heap timer into
 * every checkpoint. Here the timers the reducer asked for are kept in the key's own state
 * ({@link Store#timers()}) and Flink holds one timer per key, at the earliest of them. When it fires, every
 * kept timer at or before the watermark is run in ascending order, each exactly as Flink would have fired it
 * (a timer asked for while firing, at or before the watermark, runs in the same round), so each key sees the
 * same sequence of reducer calls as with one Flink timer per time: the same actions in the same order per
 * key, the same state, the same counters (the differential test). Only the order of actions across keys
 * within one watermark advance differs. A Flink timer that is not the key's earliest kept one (a checkpoint
 * taken before this scheme) is run as one more kept timer, and a kept timer run at another one's call
 * deletes a Flink timer at its time, if one was restored, so that no time runs twice.
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

        /** The event-time timers the reducer asked for that have not fired yet: ascending, distinct (or empty). */
        long[] timers() throws Exception;

        /** Replace them (empty: none left). */
        void timers(long[] pending) throws Exception;
    }

    /** Where the wake-up timer and the actions go. */
    interface Sink {
        void timer(long at) throws Exception;

        void deleteTimer(long at) throws Exception;

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
        totals[SUPPRESSED] += res.suppressed;
        save(before, res.state, store);
        if (res.timers.length > 0) {
            long[] pending = store.timers();
            long[] merged = union(pending, res.timers);
            if (merged.length != pending.length) {
                store.timers(merged);
                long armed = pending.length == 0 ? NONE : pending[0];
                if (merged[0] != armed) {
                    if (armed != NONE) {
                        sink.deleteTimer(armed);
                    }
                    sink.timer(merged[0]);
                }
            }
        }
        emit(res.fires, sink);
    }

    /**
     * {@code on_timer}, for every kept timer at or before {@code watermark} (see the class comment): Flink
     * fired the key's wake-up timer {@code timestamp}; {@code watermark} is the one being advanced to.
     */
    void onTimer(long timestamp, long watermark, Store store, Sink sink, long nowMs) throws Exception {
        long[] kept = store.timers();
        long armed = kept.length == 0 ? NONE : kept[0];
        TreeSet<Long> pending = new TreeSet<>();
        for (long t : kept) {
            pending.add(t);
        }
        boolean foreign = armed != timestamp; // not our wake-up timer: run it as one more kept timer
        if (foreign) {
            pending.add(timestamp);
        }
        byte[] before = store.get();
        TriggerState state = before == null || before.length == 0 ? null : TriggerState.decode(before);
        while (!pending.isEmpty() && pending.first() <= watermark) {
            long at = pending.pollFirst();
            totals[TIMERS_FIRED]++;
            if (at != timestamp) {
                sink.deleteTimer(at); // a restored timer at this time would fire it a second time
            }
            if (state == null) {
                continue; // as Flink's timer on an empty state: nothing to do
            }
            TriggerReducer.Result res = TriggerReducer.onTimer(state, at, rules, nowMs);
            totals[SUPPRESSED] += res.suppressed;
            state = res.state.isEmpty() ? null : res.state;
            for (long t : res.timers) {
                pending.add(t);
            }
            emit(res.fires, sink);
        }
        save(before, state, store);
        long[] left = pending.stream().mapToLong(Long::longValue).toArray();
        if (!java.util.Arrays.equals(left, kept)) {
            store.timers(left);
        }
        long next = left.length == 0 ? NONE : left[0];
        if (foreign && armed > watermark && armed != next) {
            sink.deleteTimer(armed); // still registered (Flink fired another one), and no longer the earliest
        }
        if (next != NONE && (!foreign || next != armed)) {
            sink.timer(next);
        }
    }

    /** Write the key's state when it changed ({@code null}: none left). */
    private static void save(byte[] before, TriggerState state, Store store) throws Exception {
        byte[] after = state == null ? null : state.encode();
        if (after == null) {
            if (before != null && before.length > 0) {
                store.clear();
            }
        } else if (before == null || !java.util.Arrays.equals(before, after)) {
            store.put(after);
        }
    }

    private void emit(List<TriggerReducer.Fire> fires, Sink sink) throws Exception {
        totals[FIRES] += fires.size();
        for (TriggerReducer.Fire f : fires) {
            sink.action(f.userKey, f.toAction());
        }
    }

    /** The ascending distinct union of two ascending distinct arrays. */
    static long[] union(long[] a, long[] b) {
        long[] out = new long[a.length + b.length];
        int i = 0;
        int j = 0;
        int n = 0;
        while (i < a.length || j < b.length) {
            long v;
            if (j >= b.length || (i < a.length && a[i] < b[j])) {
                v = a[i++];
            } else if (i >= a.length || b[j] < a[i]) {
                v = b[j++];
            } else {
                v = a[i++];
                j++;
            }
            out[n++] = v;
        }
        return n == out.length ? out : java.util.Arrays.copyOf(out, n);
    }
}

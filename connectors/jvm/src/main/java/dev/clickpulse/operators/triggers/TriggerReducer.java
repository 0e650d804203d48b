package dev.clickpulse.operators.triggers;

import static dev.clickpulse.operators.triggers.TriggerState.NONE;

import dev.clickpulse.operators.common.OperatorSupport;
import dev.clickpulse.operators.sessions.SessionJson;
import dev.clickpulse.operators.triggers.TriggerState.Count;
import dev.clickpulse.operators.triggers.TriggerState.Group;
import dev.clickpulse.operators.triggers.TriggerState.Returning;
import dev.clickpulse.operators.triggers.TriggerState.RuleState;
import dev.clickpulse.operators.triggers.TriggerState.Sequence;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;

/**
 * The port of {@code udfs/rules/evaluate.py}'s {@code step} and {@code on_timer}, which stay the
 * specification (the differential test {@code tests/job/test_triggers_differential.py} requires identical
 * actions, states and counts on generated histories). Every method mirrors the Python function of the same
 * name; states are fresh objects per call (decoded from keyed state), so updating them in place is safe.
 */
final class TriggerReducer {
    private TriggerReducer() {}

    static final long CLEANUP_GRANULARITY_MS = 60_000;
    static final int MAX_GROUPS_PER_RULE = 1_024;

    /** A rule fired: the action record {@code Fire.to_action()} renders. */
    static final class Fire {
        final String actionId;
        final String ruleId;
        final String userKey;
        final long firedAtMs;
        final long eventTimeMs;
        final List<Map<String, Object>> events;
        final Map<String, Object> details;

        Fire(String actionId, String ruleId, String userKey, long firedAtMs, long eventTimeMs,
                List<Map<String, Object>> events, Map<String, Object> details) {
            this.actionId = actionId;
            this.ruleId = ruleId;
            this.userKey = userKey;
            this.firedAtMs = firedAtMs;
            this.eventTimeMs = eventTimeMs;
            this.events = events;
            this.details = details;
        }

        /** The {@code actions} record as a JSON value (key order as {@code to_action}). */
        Map<String, Object> toAction() {
            Map<String, Object> a = new LinkedHashMap<>();
            a.put("action_id", actionId);
            a.put("rule_id", ruleId);
            a.put("user_key", userKey);
            a.put("fired_at", SessionJson.formatMs(firedAtMs));
            a.put("event_time", SessionJson.formatMs(eventTimeMs));
            a.put("events", new ArrayList<Object>(events));
            a.put("details", details);
            return a;
        }
    }

    /** What one call returns: the new state, the fires, the timers (sorted, distinct). */
    static final class Result {
        final TriggerState state;
        final List<Fire> fires;
        final long[] timers;
        final int suppressed;

        Result(TriggerState state, List<Fire> fires, long[] timers, int suppressed) {
            this.state = state;
            this.fires = fires;
            this.timers = timers;
            this.suppressed = suppressed;
        }
    }

    /** Accumulates one call's fires, timers and suppressions. */
    private static final class Acc {
        final List<Fire> fires = new ArrayList<>(0);
        final TreeSet<Long> timers = new TreeSet<>();
        int suppressed;

        long[] timers(long above) {
            return timers.stream().mapToLong(Long::longValue).filter(t -> t > above).toArray();
        }
    }

    static String actionId(String ruleId, String groupKey, String messageId) {
        try {
            MessageDigest sha = MessageDigest.getInstance("SHA-256");
            byte[] d = sha.digest((ruleId + '\u001f' + groupKey + '\u001f' + messageId)
                    .getBytes(StandardCharsets.UTF_8));
            char[] hex = new char[d.length * 2];
            final char[] digits = "0123456789abcdef".toCharArray();
            for (int i = 0; i < d.length; i++) {
                hex[2 * i] = digits[(d[i] >> 4) & 0xf];
                hex[2 * i + 1] = digits[d[i] & 0xf];
            }
            return new String(hex);
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    // ---------------------------------------------------------------------------------------- helpers

    static long roundUp(long ms) {
        return -Math.floorDiv(-ms, CLEANUP_GRANULARITY_MS) * CLEANUP_GRANULARITY_MS;
    }

    private static boolean suppressed(TriggerRule rule, long lastFired, long atMs) {
        if (lastFired == NONE) {
            return false;
        }
        if (rule.once) {
            return true;
        }
        return rule.cooldownMs >= 0 && atMs < lastFired + rule.cooldownMs;
    }

    private static long bookkeeping(TriggerRule rule, long firedAtEventMs) {
        return rule.once || rule.cooldownMs >= 0 ? firedAtEventMs : NONE;
    }

    private static boolean bookkeepingExpired(TriggerRule rule, long lastFired, long watermark) {
        if (lastFired == NONE || rule.once) {
            return false;
        }
        return rule.cooldownMs < 0 || lastFired + rule.cooldownMs <= watermark;
    }

    private static void bookkeepingTimer(TriggerRule rule, long lastFired, Acc acc) {
        if (lastFired == NONE || rule.once || rule.cooldownMs < 0) {
            return;
        }
        acc.timers.add(roundUp(lastFired + rule.cooldownMs));
    }

    /** {@code _event_view}: id, name, time; {@code properties.*} fields under properties, others under fields. */
    private static Map<String, Object> eventView(String messageId, String name, long tsMs, Map<String, Object> fields) {
        Map<String, Object> view = new LinkedHashMap<>();
        view.put("message_id", messageId);
        view.put("event", name);
        view.put("timestamp", SessionJson.formatMs(tsMs));
        Map<String, Object> props = new LinkedHashMap<>();
        Map<String, Object> others = new LinkedHashMap<>();
        for (Map.Entry<String, Object> e : fields.entrySet()) {
            if (e.getKey().startsWith("properties.")) {
                props.put(e.getKey().substring("properties.".length()), e.getValue());
            } else {
                others.put(e.getKey(), e.getValue());
            }
        }
        view.put("properties", props);
        if (!others.isEmpty()) {
            view.put("fields", others);
        }
        return view;
    }

    /** {@code _reconcile}: drop the state of rules removed, disabled, changed in condition or kind. */
    private static LinkedHashMap<String, RuleState> reconcile(TriggerState state, RuleSet rules) {
        LinkedHashMap<String, RuleState> kept = new LinkedHashMap<>();
        for (Map.Entry<String, RuleState> e : state.rules.entrySet()) {
            TriggerRule rule = rules.get(e.getKey());
            RuleState rs = e.getValue();
            if (rule == null || !rule.enabled || !rule.fingerprint.equals(rs.fingerprint)) {
                continue;
            }
            boolean kind = (rule.form == TriggerRule.Form.COUNT && rs instanceof Count)
                    || (rule.form == TriggerRule.Form.SEQUENCE && rs instanceof Sequence)
                    || (rule.form == TriggerRule.Form.RETURNING && rs instanceof Returning);
            if (kind) {
                kept.put(e.getKey(), rs);
            }
        }
        return kept;
    }

    // ------------------------------------------------------------------------------------------ count

    /** {@code _count_step}; returns the new state or {@code rs} itself when unchanged ({@code null} = none). */
    private static RuleState countStep(TriggerRule rule, Count rs, TriggerEvent ev, long nowMs, Acc acc,
            JsonFactory json) {
        if (!rule.match.matches(ev, json)) {
            return rs;
        }
        int nPaths = rule.groupByPaths.length;
        Object[] values = new Object[nPaths];
        for (int i = 0; i < nPaths; i++) {
            values[i] = Json.lookup(json, ev.record, rule.groupByPaths[i]);
            if (values[i] == null) {
                return rs;
            }
        }
        String groupKey = nPaths == 0 ? "" : Json.dumps(Arrays.asList(values));
        LinkedHashMap<String, Group> groups = rs != null ? rs.groups : new LinkedHashMap<>();
        Group gs = groups.get(groupKey);
        long[] oldTs = gs == null ? new long[0] : gs.hitTs;
        String[] oldIds = gs == null ? new String[0] : gs.hitIds;
        long maxTs = oldTs.length > 0 ? Math.max(gs.maxTs, ev.tsMs) : ev.tsMs;
        long within = rule.withinMs;
        long horizon = maxTs - within;
        if (ev.tsMs < horizon) {
            return rs; // too late for this window
        }
        for (String m : oldIds) {
            if (m.equals(ev.messageId)) {
                return rs; // a redelivered duplicate
            }
        }
        // hits within the horizon, then the new one inserted after equal (time, id) pairs (bisect_right)
        int kept = 0;
        for (long t : oldTs) {
            if (t >= horizon) {
                kept++;
            }
        }
        long[] ts = new long[kept + 1];
        String[] ids = new String[kept + 1];
        int j = 0;
        int k = -1;
        for (int i = 0; i < oldTs.length; i++) {
            if (oldTs[i] < horizon) {
                continue;
            }
            if (k < 0 && (oldTs[i] > ev.tsMs
                    || (oldTs[i] == ev.tsMs && OperatorSupport.compareCodePoints(oldIds[i], ev.messageId) > 0))) {
                k = j;
                ts[j] = ev.tsMs;
                ids[j] = ev.messageId;
                j++;
            }
            ts[j] = oldTs[i];
            ids[j] = oldIds[i];
            j++;
        }
        if (k < 0) {
            k = j;
            ts[j] = ev.tsMs;
            ids[j] = ev.messageId;
        }
        int n = rule.countAtLeast;
        int len = ts.length;
        int window = -1;
        for (int i = Math.max(0, k - n + 1); i <= Math.min(k, len - n); i++) {
            if (ts[i + n - 1] - ts[i] <= within) {
                window = i;
                break;
            }
        }
        long lastFired = gs == null ? NONE : gs.lastFired;
        boolean held = window >= 0 && suppressed(rule, lastFired, ev.tsMs);
        if (held) {
            acc.suppressed++;
        }
        if (window >= 0 && !held) {
            Map<String, Object> group = new LinkedHashMap<>();
            for (int i = 0; i < nPaths; i++) {
                group.put(rule.groupBy[i], values[i]);
            }
            Map<String, Object> fields = new LinkedHashMap<>(group);
            fields.putAll(rule.match.fields());
            List<Map<String, Object>> views = new ArrayList<>(n);
            for (int i = window; i < window + n; i++) {
                views.add(eventView(ids[i], rule.match.event, ts[i], fields));
            }
            Map<String, Object> details = new LinkedHashMap<>();
            details.put("group", group);
            details.put("count", (long) n);
            details.put("within_ms", within);
            acc.fires.add(new Fire(actionId(rule.id, groupKey, ev.messageId), rule.id, ev.userKey, nowMs,
                    ev.tsMs, views, details));
            ts = new long[0];
            ids = new String[0];
            lastFired = bookkeeping(rule, ev.tsMs);
        } else if (n > 1) {
            int keep = Math.min(n - 1, len);
            ts = Arrays.copyOfRange(ts, len - keep, len);
            ids = Arrays.copyOfRange(ids, len - keep, len);
        } else {
            ts = new long[0];
            ids = new String[0];
        }
        if (ts.length > 0) {
            acc.timers.add(roundUp(maxTs + within));
        }
        bookkeepingTimer(rule, lastFired, acc);
        if (ts.length > 0 || lastFired != NONE) {
            groups.put(groupKey, new Group(ts, ids, maxTs, lastFired));
        } else {
            groups.remove(groupKey);
        }
        if (groups.size() > MAX_GROUPS_PER_RULE) {
            evict(groups, groupKey);
        }
        return groups.isEmpty() ? null : new Count(rule.fingerprint, groups);
    }

    private static void evict(LinkedHashMap<String, Group> groups, String keep) {
        List<Map.Entry<String, Group>> candidates = new ArrayList<>();
        for (Map.Entry<String, Group> e : groups.entrySet()) {
            if (e.getValue().lastFired == NONE && !e.getKey().equals(keep)) {
                candidates.add(e);
            }
        }
        candidates.sort((a, b) -> {
            int c = Long.compare(a.getValue().maxTs, b.getValue().maxTs);
            return c != 0 ? c : OperatorSupport.compareCodePoints(a.getKey(), b.getKey());
        });
        int excess = groups.size() - MAX_GROUPS_PER_RULE;
        List<String> drop = new ArrayList<>();
        for (int i = 0; i < Math.min(excess, candidates.size()); i++) {
            drop.add(candidates.get(i).getKey());
        }
        for (String key : drop) {
            groups.remove(key);
        }
    }

    private static RuleState countExpire(TriggerRule rule, Count rs, long watermark, Acc acc) {
        LinkedHashMap<String, Group> groups = new LinkedHashMap<>();
        for (Map.Entry<String, Group> e : rs.groups.entrySet()) {
            Group gs = e.getValue();
            int kept = 0;
            for (long t : gs.hitTs) {
                if (t + rule.withinMs > watermark) {
                    kept++;
                }
            }
            long[] ts = new long[kept];
            String[] ids = new String[kept];
            int j = 0;
            for (int i = 0; i < gs.hitTs.length; i++) {
                if (gs.hitTs[i] + rule.withinMs > watermark) {
                    ts[j] = gs.hitTs[i];
                    ids[j] = gs.hitIds[i];
                    j++;
                }
            }
            long lastFired = bookkeepingExpired(rule, gs.lastFired, watermark) ? NONE : gs.lastFired;
            if (kept == 0 && lastFired == NONE) {
                continue;
            }
            groups.put(e.getKey(), new Group(ts, ids, gs.maxTs, lastFired));
            if (kept > 0) {
                acc.timers.add(roundUp(gs.maxTs + rule.withinMs));
            }
            bookkeepingTimer(rule, lastFired, acc);
        }
        return groups.isEmpty() ? null : new Count(rs.fingerprint, groups);
    }

    // --------------------------------------------------------------------------------------- sequence

    private static RuleState sequenceStep(TriggerRule rule, Sequence rs, TriggerEvent ev, Acc acc, JsonFactory json) {
        long pending = rs == null ? NONE : rs.pendingMs;
        String pendingId = rs == null ? null : rs.pendingMessageId;
        long lastFired = rs == null ? NONE : rs.lastFired;
        if (pending != NONE && rule.thenNot.matches(ev, json) && pending <= ev.tsMs
                && ev.tsMs <= pending + rule.withinMs) {
            pending = NONE;
            pendingId = null;
        } else if (pending == NONE && rule.first.matches(ev, json) && !(rule.once && lastFired != NONE)) {
            pending = ev.tsMs;
            pendingId = ev.messageId;
            acc.timers.add(ev.tsMs + rule.withinMs);
        }
        if (pending == NONE && lastFired == NONE) {
            return null;
        }
        return new Sequence(rule.fingerprint, pending, pendingId, lastFired);
    }

    private static RuleState sequenceExpire(TriggerRule rule, Sequence rs, long watermark, String userKey, long nowMs,
            Acc acc) {
        long pending = rs.pendingMs;
        String pendingId = rs.pendingMessageId;
        long lastFired = rs.lastFired;
        if (pending != NONE && pendingId != null) {
            long deadline = pending + rule.withinMs;
            if (deadline <= watermark) {
                if (suppressed(rule, lastFired, deadline)) {
                    acc.suppressed++;
                } else {
                    Map<String, Object> details = new LinkedHashMap<>();
                    details.put("missing", rule.thenNot.event);
                    details.put("within_ms", rule.withinMs);
                    details.put("deadline", SessionJson.formatMs(deadline));
                    List<Map<String, Object>> views = new ArrayList<>(1);
                    views.add(eventView(pendingId, rule.first.event, pending, rule.first.fields()));
                    acc.fires.add(new Fire(actionId(rule.id, "", pendingId), rule.id, userKey, nowMs, deadline,
                            views, details));
                    lastFired = bookkeeping(rule, deadline);
                }
                pending = NONE;
                pendingId = null;
            }
        }
        if (bookkeepingExpired(rule, lastFired, watermark)) {
            lastFired = NONE;
        }
        if (pending != NONE) {
            acc.timers.add(pending + rule.withinMs);
        }
        bookkeepingTimer(rule, lastFired, acc);
        if (pending == NONE && lastFired == NONE) {
            return null;
        }
        return new Sequence(rs.fingerprint, pending, pendingId, lastFired);
    }

    // -------------------------------------------------------------------------------------- returning

    private static RuleState returningStep(TriggerRule rule, Returning rs, TriggerEvent ev, long nowMs, Acc acc,
            JsonFactory json) {
        if (!rule.match.matches(ev, json)) {
            return rs;
        }
        long last = rs == null ? NONE : rs.lastSeen;
        long lastFired = rs == null ? NONE : rs.lastFired;
        boolean returned = last != NONE && ev.tsMs - last >= rule.afterMs;
        boolean held = returned && suppressed(rule, lastFired, ev.tsMs);
        if (held) {
            acc.suppressed++;
        }
        if (returned && !held) {
            Map<String, Object> details = new LinkedHashMap<>();
            details.put("previous_seen", SessionJson.formatMs(last));
            details.put("absent_ms", ev.tsMs - last);
            List<Map<String, Object>> views = new ArrayList<>(1);
            views.add(eventView(ev.messageId, ev.name, ev.tsMs, rule.match.fields()));
            acc.fires.add(new Fire(actionId(rule.id, "", ev.messageId), rule.id, ev.userKey, nowMs, ev.tsMs, views,
                    details));
            lastFired = bookkeeping(rule, ev.tsMs);
        }
        long lastSeen = last == NONE || ev.tsMs > last ? ev.tsMs : last;
        acc.timers.add(roundUp(lastSeen + rule.rememberForMs));
        bookkeepingTimer(rule, lastFired, acc);
        return new Returning(rule.fingerprint, lastSeen, lastFired);
    }

    private static RuleState returningExpire(TriggerRule rule, Returning rs, long watermark, Acc acc) {
        long lastSeen = rs.lastSeen;
        long lastFired = rs.lastFired;
        if (lastSeen != NONE && lastSeen + rule.rememberForMs <= watermark) {
            lastSeen = NONE;
        }
        if (bookkeepingExpired(rule, lastFired, watermark)) {
            lastFired = NONE;
        }
        if (lastSeen == NONE && lastFired == NONE) {
            return null;
        }
        if (lastSeen != NONE) {
            acc.timers.add(roundUp(lastSeen + rule.rememberForMs));
        }
        bookkeepingTimer(rule, lastFired, acc);
        return new Returning(rs.fingerprint, lastSeen, lastFired);
    }

    // ------------------------------------------------------------------------------------ the reducer

    /** {@code step}: one event of this user through every enabled rule. */
    static Result step(TriggerState state, TriggerEvent ev, RuleSet rules, long nowMs, JsonFactory json) {
        LinkedHashMap<String, RuleState> kept = reconcile(state, rules);
        Acc acc = new Acc();
        for (TriggerRule rule : rules.active()) {
            RuleState current = kept.get(rule.id);
            RuleState next;
            switch (rule.form) {
                case COUNT:
                    next = countStep(rule, current instanceof Count ? (Count) current : null, ev, nowMs, acc, json);
                    break;
                case SEQUENCE:
                    next = sequenceStep(rule, current instanceof Sequence ? (Sequence) current : null, ev, acc, json);
                    break;
                default:
                    next = returningStep(rule, current instanceof Returning ? (Returning) current : null, ev, nowMs,
                            acc, json);
            }
            if (next == null) {
                kept.remove(rule.id);
            } else {
                kept.put(rule.id, next);
            }
        }
        return new Result(new TriggerState(ev.userKey, kept), acc.fires, acc.timers(Long.MIN_VALUE), acc.suppressed);
    }

    /** {@code on_timer}: the watermark passed {@code timestamp}. */
    static Result onTimer(TriggerState state, long timestamp, RuleSet rules, long nowMs) {
        LinkedHashMap<String, RuleState> kept = reconcile(state, rules);
        Acc acc = new Acc();
        LinkedHashMap<String, RuleState> out = new LinkedHashMap<>();
        for (Map.Entry<String, RuleState> e : kept.entrySet()) {
            TriggerRule rule = rules.get(e.getKey());
            RuleState rs = e.getValue();
            RuleState next;
            if (rs instanceof Count) {
                next = countExpire(rule, (Count) rs, timestamp, acc);
            } else if (rs instanceof Sequence) {
                next = sequenceExpire(rule, (Sequence) rs, timestamp, state.userKey, nowMs, acc);
            } else {
                next = returningExpire(rule, (Returning) rs, timestamp, acc);
            }
            if (next != null) {
                out.put(e.getKey(), next);
            }
        }
        return new Result(new TriggerState(state.userKey, out), acc.fires, acc.timers(timestamp), acc.suppressed);
    }
}

package dev.clickpulse.operators.triggers;

import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;

/**
 * One validated rule, as {@code udfs.rules.definition.Rule.compiled()} renders it: the condition's canonical
 * form plus id, fingerprint, enabled, once, cooldown and the event names it uses. Validation happened in
 * Python ({@code compile_rule_record}); this only reads the result. Built in {@code open()} from JSON text, so
 * nothing here is Java-serialized.
 */
public final class TriggerRule {

    /** The condition forms. */
    public enum Form { COUNT, SEQUENCE, RETURNING }

    /** Event types that never count as activity for a matcher without an event name. */
    static final Set<String> ACTIVITY_EXCLUDED_TYPES = Set.of("identify", "alias");

    /** {@code EventMatcher}: an event name ({@code null} = any activity event) and equality filters. */
    public static final class Matcher {
        final String event;
        final String[] names;
        final String[][] paths;
        final Object[] values;

        Matcher(String event, String[] names, Object[] values) {
            this.event = event;
            this.names = names;
            this.paths = new String[names.length][];
            for (int i = 0; i < names.length; i++) {
                this.paths[i] = names[i].split("\\.", -1);
            }
            this.values = values;
        }

        boolean matches(TriggerEvent ev, JsonFactory json) {
            if (event == null) {
                if (ev.type != null && ACTIVITY_EXCLUDED_TYPES.contains(ev.type)) {
                    return false;
                }
            } else if (!event.equals(ev.name)) {
                return false;
            }
            for (int i = 0; i < paths.length; i++) {
                if (!Json.scalarEqual(Json.lookup(json, ev.record, paths[i]), value(i))) {
                    return false;
                }
            }
            return true;
        }

        Object value(int i) {
            return values[i];
        }

        /** {@code _matcher_fields}: dotted path to expected value, in order. */
        Map<String, Object> fields() {
            Map<String, Object> out = new LinkedHashMap<>();
            for (int i = 0; i < names.length; i++) {
                out.put(names[i], value(i));
            }
            return out;
        }
    }

    final String id;
    final String fingerprint;
    final boolean enabled;
    final boolean once;
    /** The cooldown in ms, or -1 for none. */
    final long cooldownMs;
    /** Event names the rule uses, {@code null} when any event can matter. */
    final Set<String> events;
    final Form form;
    // count
    final Matcher match;
    final String[] groupBy;
    final String[][] groupByPaths;
    final int countAtLeast;
    final long withinMs;
    // sequence
    final Matcher first;
    final Matcher thenNot;
    // returning
    final long afterMs;
    final long rememberForMs;

    private TriggerRule(Map<String, Object> c) {
        id = (String) c.get("id");
        fingerprint = (String) c.get("fingerprint");
        enabled = Boolean.TRUE.equals(c.get("enabled"));
        once = Boolean.TRUE.equals(c.get("once"));
        cooldownMs = c.get("cooldown_ms") == null ? -1 : ((Number) c.get("cooldown_ms")).longValue();
        List<?> names = (List<?>) c.get("events");
        if (names == null) {
            events = null;
        } else {
            Set<String> s = new HashSet<>();
            for (Object n : names) {
                s.add((String) n);
            }
            events = s;
        }
        String f = (String) c.get("form");
        switch (f) {
            case "count": {
                form = Form.COUNT;
                match = matcher(c.get("match"));
                List<?> g = (List<?>) c.get("group_by");
                groupBy = new String[g.size()];
                groupByPaths = new String[g.size()][];
                for (int i = 0; i < groupBy.length; i++) {
                    groupBy[i] = (String) g.get(i);
                    groupByPaths[i] = groupBy[i].split("\\.", -1);
                }
                countAtLeast = ((Number) c.get("count_at_least")).intValue();
                withinMs = ((Number) c.get("within_ms")).longValue();
                first = null;
                thenNot = null;
                afterMs = 0;
                rememberForMs = 0;
                break;
            }
            case "sequence":
                form = Form.SEQUENCE;
                first = matcher(c.get("first"));
                thenNot = matcher(c.get("then_not"));
                withinMs = ((Number) c.get("within_ms")).longValue();
                match = null;
                groupBy = null;
                groupByPaths = null;
                countAtLeast = 0;
                afterMs = 0;
                rememberForMs = 0;
                break;
            case "returning":
                form = Form.RETURNING;
                match = matcher(c.get("match"));
                afterMs = ((Number) c.get("after_ms")).longValue();
                rememberForMs = ((Number) c.get("remember_for_ms")).longValue();
                first = null;
                thenNot = null;
                groupBy = null;
                groupByPaths = null;
                countAtLeast = 0;
                withinMs = 0;
                break;
            default:
                throw new IllegalArgumentException("rule " + id + ": unknown form " + f);
        }
    }

    @SuppressWarnings("unchecked")
    private static Matcher matcher(Object raw) {
        Map<String, Object> m = (Map<String, Object>) raw;
        List<List<Object>> where = (List<List<Object>>) m.get("where");
        String[] names = new String[where.size()];
        Object[] values = new Object[where.size()];
        for (int i = 0; i < names.length; i++) {
            names[i] = (String) where.get(i).get(0);
            values[i] = where.get(i).get(1);
        }
        return new Matcher((String) m.get("event"), names, values);
    }

    /** A rule from its compiled form (a parsed JSON object). */
    @SuppressWarnings("unchecked")
    public static TriggerRule of(Object compiled) {
        return new TriggerRule((Map<String, Object>) compiled);
    }
}

package dev.clickpulse.operators.triggers;

import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Set;

/** {@code udfs.rules.definition.Rules}: the rules in force by id (insertion order), the enabled ones, the
 * event names they need. Immutable once built. */
final class RuleSet {
    private final LinkedHashMap<String, TriggerRule> byId;
    private final List<TriggerRule> active = new ArrayList<>();
    /** {@code relevant_events()}: names any enabled rule can use; {@code null} = every event may matter. */
    final Set<String> relevant;

    RuleSet(LinkedHashMap<String, TriggerRule> byId) {
        this.byId = byId;
        Set<String> names = new HashSet<>();
        boolean all = false;
        for (TriggerRule r : byId.values()) {
            if (r.enabled) {
                active.add(r);
                if (r.events == null) {
                    all = true;
                } else {
                    names.addAll(r.events);
                }
            }
        }
        relevant = all ? null : names;
    }

    TriggerRule get(String id) {
        return byId.get(id);
    }

    List<TriggerRule> active() {
        return active;
    }

    int size() {
        return byId.size();
    }

    static RuleSet none() {
        return new RuleSet(new LinkedHashMap<>());
    }

    static Set<String> setOf(Collection<String> names) {
        return new HashSet<>(names);
    }
}

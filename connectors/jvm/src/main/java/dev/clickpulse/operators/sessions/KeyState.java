package dev.clickpulse.operators.sessions;

import java.util.Arrays;
import java.util.Collections;
import java.util.List;

/**
 * Everything kept for one user_key (``udfs.sessions.KeyState``): open and recently closed sessions sorted
 * by start, the newest accepted event time (``maxTs``, null before the first) and the event-time timers
 * registered and not fired yet (sorted).
 */
public final class KeyState {
    static final KeyState EMPTY = new KeyState("", Collections.emptyList(), null, new long[0]);

    final String userKey;
    final List<Session> sessions;
    final Long maxTs;
    final long[] timers;

    KeyState(String userKey, List<Session> sessions, Long maxTs, long[] timers) {
        this.userKey = userKey;
        this.sessions = sessions;
        this.maxTs = maxTs;
        this.timers = timers;
    }

    /** True when nothing needs to be stored. */
    public boolean isEmpty() {
        return sessions.isEmpty();
    }

    boolean sameTimers(long[] other) {
        return Arrays.equals(timers, other);
    }
}

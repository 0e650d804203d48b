package dev.clickpulse.operators.sessions;

import java.util.List;

/** Result of a reducer call: new state, records to send, timers to register, counts. */
public final class StepResult {
    public final KeyState state;
    public final List<Emit> emits;
    public final long[] timers;
    public final Counts counts;

    StepResult(KeyState state, List<Emit> emits, long[] timers, Counts counts) {
        this.state = state;
        this.emits = emits;
        this.timers = timers;
        this.counts = counts;
    }
}

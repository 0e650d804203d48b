package dev.clickpulse.operators.sessions;

/** What one reducer call did, for metrics (``udfs.sessions.Counts``). */
public final class Counts {
    /** Counter names, in the order of the Python operator's log line. */
    public static final String[] NAMES = {
        "opened", "closed", "updated", "merged", "retracted", "late", "late_accepted", "purged"
    };
    static final Counts NONE = new Counts(0, 0, 0, 0, 0, 0, 0, 0);

    public final int opened;
    public final int closed;
    public final int updated;
    public final int merged;
    public final int retracted;
    public final int late;
    public final int lateAccepted;
    public final int purged;

    Counts(int opened, int closed, int updated, int merged, int retracted, int late, int lateAccepted,
            int purged) {
        this.opened = opened;
        this.closed = closed;
        this.updated = updated;
        this.merged = merged;
        this.retracted = retracted;
        this.late = late;
        this.lateAccepted = lateAccepted;
        this.purged = purged;
    }

    /** The counts in the order of {@link #NAMES}. */
    public int[] values() {
        return new int[] {opened, closed, updated, merged, retracted, late, lateAccepted, purged};
    }

    public boolean isZero() {
        return (opened | closed | updated | merged | retracted | late | lateAccepted | purged) == 0;
    }
}

namespace ActorVmm.Devices;

/// <summary>
/// One interrupt line, the same verbs everywhere (PIC, IOAPIC, LAPIC LINTn, a test probe):
/// Assert raises a level, Deassert drops it, Pulse is an edge (assert then deassert).
/// Implementations must be cheap and must not block: models call them from inside Read/Write.
/// </summary>
public interface IInterruptLine
{
    void Assert();
    void Deassert();
    void Pulse();
}

/// <summary>A line into a model's input whose level <paramref name="setLevel"/> sets (true: high);
/// a pulse is the level high, then low.</summary>
public sealed class LevelInput(Action<bool> setLevel) : IInterruptLine
{
    public void Assert() => setLevel(true);

    public void Deassert() => setLevel(false);

    public void Pulse()
    {
        setLevel(true);
        setLevel(false);
    }
}

/// <summary>A line that goes nowhere (an unwired device pin). Counts what it is told, for stats.</summary>
public sealed class NullInterruptLine : IInterruptLine
{
    public static readonly NullInterruptLine Instance = new();
    public void Assert() { }
    public void Deassert() { }
    public void Pulse() { }
}

/// <summary>A line that remembers its level and counts edges: for model tests and for snapshots.</summary>
public sealed class RecordingInterruptLine : IInterruptLine
{
    public bool Level { get; private set; }
    public int Asserts { get; private set; }
    public int Pulses { get; private set; }

    public void Assert()
    {
        if (!Level) Asserts++;
        Level = true;
    }

    public void Deassert() => Level = false;

    public void Pulse()
    {
        Pulses++;
        Level = false;
    }
}

namespace ActorVmm.Devices.Tests;

/// <summary>Counts every call (not only edges), so tests can check a model reports changes only.</summary>
internal sealed class CountingInterruptLine : IInterruptLine
{
    public bool Level { get; private set; }
    public int AssertCalls { get; private set; }
    public int DeassertCalls { get; private set; }
    public int PulseCalls { get; private set; }

    public void Assert()
    {
        AssertCalls++;
        Level = true;
    }

    public void Deassert()
    {
        DeassertCalls++;
        Level = false;
    }

    public void Pulse()
    {
        PulseCalls++;
        Level = false;
    }
}

internal sealed class RecordingEvents : IPlatformEvents
{
    public List<(int Status, string Reason)> Exits { get; } = [];
    public List<string> Resets { get; } = [];
    public List<string> PowerOffs { get; } = [];
    public List<ulong> PageFlushes { get; } = [];

    public void RequestExit(int status, string reason) => Exits.Add((status, reason));
    public void RequestReset(string reason) => Resets.Add(reason);
    public void RequestPowerOff(string reason) => PowerOffs.Add(reason);
    public void RequestPageFlush(ulong gpa) => PageFlushes.Add(gpa);
}

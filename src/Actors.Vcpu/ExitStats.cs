using System.Diagnostics;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>
/// Per exit reason: how many exits, and a histogram of how long the VMM took to handle each one
/// (from KVM_RUN's return to the next KVM_RUN: device round trips included), in power-of-two
/// microsecond buckets: [0,1), [1,2), [2,4), ... [512,1024), then >= 1024 µs.
/// Owned by the vcpu's thread; two timestamps per exit.
/// </summary>
internal sealed class ExitStats
{
    public const int Buckets = 12;

    private static readonly string[] Names =
        ["io-out", "io-in", "mmio-write", "mmio-read", "hlt", "intr", "msr", "dirty-ring-full", "other"];

    private readonly long[] _counts = new long[Names.Length];
    private readonly long[,] _latency = new long[Names.Length, Buckets];
    private int _pending = -1;
    private long _exitedAt;

    /// <summary>Exits in all; port and MMIO accesses handled (an unassigned one included, a string
    /// I/O counted once); HLT and interrupt exits; accesses no device answers.</summary>
    public long Exits, IoExits, MmioExits, HltExits, IntrExits, UnassignedReads, UnassignedWrites;

    /// <summary>Counts an access exit as port or MMIO.</summary>
    public void Access(VmExit exit)
    {
        if (exit is VmExit.Io) IoExits++;
        else MmioExits++;
    }

    /// <summary>The counts for <see cref="VcpuProtocol.GetStats"/>.</summary>
    public VcpuProtocol.Stats Report(int vcpuId, VcpuProtocol.State state, long injected) =>
        new(vcpuId, state, Exits, IoExits, MmioExits, HltExits, IntrExits, UnassignedReads, UnassignedWrites, injected)
        {
            Reasons = Snapshot(),
        };

    /// <summary>The vcpu left the guest with <paramref name="exit"/>.</summary>
    public void Exited(VmExit exit)
    {
        _exitedAt = Stopwatch.GetTimestamp();
        Exits++;
        _pending = exit switch
        {
            VmExit.Io { IsOut: true } => 0,
            VmExit.Io => 1,
            VmExit.Mmio { IsWrite: true } => 2,
            VmExit.Mmio => 3,
            VmExit.Hlt => 4,
            VmExit.Intr => 5,
            VmExit.MsrRead or VmExit.MsrWrite => 6,
            VmExit.DirtyRingFull => 7,
            _ => 8,
        };
        _counts[_pending]++;
    }

    /// <summary>The vcpu is about to enter the guest again: the pending exit is handled.</summary>
    public void Entering()
    {
        if (_pending < 0) return;
        var micros = Stopwatch.GetElapsedTime(_exitedAt).Ticks / 10;
        var bucket = micros <= 0 ? 0 : Math.Min(Buckets - 1, 64 - (int)ulong.LeadingZeroCount((ulong)micros));
        _latency[_pending, bucket]++;
        _pending = -1;
    }

    public VcpuProtocol.ExitReasonStats[] Snapshot()
    {
        var result = new List<VcpuProtocol.ExitReasonStats>();
        for (var i = 0; i < Names.Length; i++)
        {
            if (_counts[i] == 0) continue;
            var buckets = new long[Buckets];
            for (var b = 0; b < Buckets; b++) buckets[b] = _latency[i, b];
            result.Add(new VcpuProtocol.ExitReasonStats(Names[i], _counts[i], buckets));
        }
        return result.ToArray();
    }
}

using Akka.Actor;
using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>
/// The guest's vmspace. First version: it owns the memory map (memfd segments registered as KVM
/// memslots) and serves bounds-checked reads and writes of guest memory to devices and tools.
/// Demand paging, A/D tracking, EPT generations and holds come later and plug in here.
/// </summary>
public static class VmspaceProtocol
{
    public interface IVmspaceMessage;

    /// <summary>Reads guest memory; answered with <see cref="MemoryData"/> or <see cref="MemoryFault"/>.</summary>
    public sealed record ReadMemory(long Id, ulong Address, int Length) : IVmspaceMessage;

    public sealed record MemoryData(long Id, ulong Address, byte[] Data) : IVmspaceMessage;

    /// <summary>Writes guest memory; answered with <see cref="MemoryWritten"/> or <see cref="MemoryFault"/>.</summary>
    public sealed record WriteMemory(long Id, ulong Address, byte[] Data) : IVmspaceMessage;

    public sealed record MemoryWritten(long Id) : IVmspaceMessage;

    public sealed record MemoryFault(long Id, ulong Address, int Length, string Reason) : IVmspaceMessage;

    public sealed record GetLayout : IVmspaceMessage { public static readonly GetLayout Instance = new(); }

    public sealed record Segment(string Name, ulong Base, ulong Size, bool ReadOnly);

    public sealed record Layout(IReadOnlyList<Segment> Segments) : IVmspaceMessage;

    public sealed record GetStats : IVmspaceMessage { public static readonly GetStats Instance = new(); }

    /// <summary>Memory counters. Resident is what the host has actually allocated for guest RAM.</summary>
    public sealed record Stats(ulong GuestBytes, ulong ResidentBytes, long Reads, long Writes, long Faults) : IVmspaceMessage;

    /// <summary>Largest single read or write a message may carry.</summary>
    public const int MaxTransfer = 1 << 20;

    public static Props Props(GuestMemoryMap memory) => Akka.Actor.Props.Create(() => new VmspaceActor(memory));
}

internal sealed class VmspaceActor : ReceiveActor
{
    private readonly GuestMemoryMap _memory;
    private long _reads, _writes, _faults;

    public VmspaceActor(GuestMemoryMap memory)
    {
        _memory = memory;
        Receive<VmspaceProtocol.ReadMemory>(r =>
        {
            _reads++;
            if (r.Length < 0 || r.Length > VmspaceProtocol.MaxTransfer)
            {
                Fault(r.Id, r.Address, r.Length, $"length {r.Length} is outside 0..{VmspaceProtocol.MaxTransfer}");
                return;
            }
            var data = new byte[r.Length];
            if (_memory.TryRead(new GuestPhysAddr(r.Address), data)) Sender.Tell(new VmspaceProtocol.MemoryData(r.Id, r.Address, data));
            else Fault(r.Id, r.Address, r.Length, "outside guest memory");
        });
        Receive<VmspaceProtocol.WriteMemory>(w =>
        {
            _writes++;
            var a = new GuestPhysAddr(w.Address);
            if (w.Data.Length > VmspaceProtocol.MaxTransfer) Fault(w.Id, w.Address, w.Data.Length, "too long");
            else if (IsReadOnly(a, (ulong)w.Data.Length)) Fault(w.Id, w.Address, w.Data.Length, "read-only memory");
            else if (_memory.TryWrite(a, w.Data)) Sender.Tell(new VmspaceProtocol.MemoryWritten(w.Id));
            else Fault(w.Id, w.Address, w.Data.Length, "outside guest memory");
        });
        Receive<VmspaceProtocol.GetLayout>(_ => Sender.Tell(new VmspaceProtocol.Layout(
            _memory.Segments.Select(s => new VmspaceProtocol.Segment(s.Name, s.Base.Value, s.Size, s.ReadOnly)).ToArray())));
        Receive<VmspaceProtocol.GetStats>(_ => Sender.Tell(new VmspaceProtocol.Stats(
            _memory.Segments.Aggregate(0UL, (a, s) => a + s.Size), ResidentBytes(), _reads, _writes, _faults)));
    }

    private bool IsReadOnly(GuestPhysAddr a, ulong length) =>
        _memory.Segments.Any(s => s.ReadOnly && a.Value < s.End.Value && s.Base.Value < a.Value + length);

    private void Fault(long id, ulong address, int length, string reason)
    {
        _faults++;
        Sender.Tell(new VmspaceProtocol.MemoryFault(id, address, length, reason));
    }

    /// <summary>Bytes the host has allocated for the backing memfds (untouched pages cost nothing).</summary>
    private ulong ResidentBytes() =>
        _memory.Segments.Select(s => s.Backing).Distinct().Aggregate(0UL, (a, r) => a + r.AllocatedBytes);
}

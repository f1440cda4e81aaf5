using System.Buffers.Binary;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>What a message did to the reply the vcpu waits for.</summary>
internal enum ReplyProgress : byte
{
    /// <summary>Not (part of) that reply.</summary>
    None,
    /// <summary>One element of several is in; the next one was asked for.</summary>
    More,
    /// <summary>The whole reply is in and the exit is complete in kvm_run.</summary>
    Complete,
    /// <summary>The whole of a waited write is in, and one of its elements ended the machine.</summary>
    MachineEnding,
}

/// <summary>
/// A vcpu's requests to its device actors, its vlapic and its 8259, and the one reply it waits for
/// (<see cref="PendingReply"/>). Writes are posted, at most <see cref="DeviceProtocol.WriteWindow"/>
/// per device before its credit comes back; a write to a device that can end the machine, a read,
/// an APIC MSR access and an INTA wait for their reply, which completes the exit in kvm_run (KVM
/// api.rst: the data of KVM_EXIT_IO / KVM_EXIT_MMIO / KVM_EXIT_X86_RDMSR is read back at the next
/// KVM_RUN). A string IN/OUT (REP INS/OUTS, several elements in one exit) is one request per
/// element, read element by element. Owned by the vcpu's thread.
/// </summary>
internal sealed class DeviceAccess(IVcpu vcpu, IActorRef self, ExitStats stats, IEnumerable<DeviceRoute> routes)
{
    /// <summary>One route per device, the last one named (a device's routes for several ranges share its write window).</summary>
    private readonly Dictionary<IActorRef, DeviceRoute> _routesByDevice = routes.GroupBy(r => r.Device).ToDictionary(g => g.Key, g => g.Last());
    private long _lastId;

    /// <summary>This vcpu's route to <paramref name="device"/> (a new one, named <paramref name="name"/>,
    /// if it had none), so a range added later shares the device's write window and credits.</summary>
    public DeviceRoute RouteTo(IActorRef device, string name)
    {
        if (!_routesByDevice.TryGetValue(device, out var route)) _routesByDevice[device] = route = new DeviceRoute(name, device);
        return route;
    }

    /// <summary>The reply the vcpu waits for; null when none is.</summary>
    public PendingReply? Reply { get; private set; }

    /// <summary>The device whose write window is full (the vcpu waits for its credit); null when none is.</summary>
    public DeviceRoute? BlockedOn { get; private set; }

    /// <summary>Posts the write(s) of <paramref name="exit"/>. False when the device's write window is
    /// now full: the vcpu must wait for credit (<see cref="BlockedOn"/>) before it enters again.</summary>
    public bool Post(VmExit exit, in ExitAction action)
    {
        var route = action.Route!;
        stats.Access(exit);
        var count = Elements(exit);
        for (var i = 0; i < count; i++)
            route.Device.Tell(new DeviceProtocol.Write(action.Offset, action.Size, Element(exit, i, action.Size)), self);
        route.InFlight += count;
        if (route.InFlight < DeviceProtocol.WriteWindow) return true;
        BlockedOn = route;
        return false;
    }

    /// <summary>Writes to a device whose writes can end the machine, one <see cref="DeviceProtocol.WriteAndWait"/>
    /// per element; the reply is the last element's <see cref="DeviceProtocol.WriteDone"/>.</summary>
    public void WriteAndWait(VmExit exit, in ExitAction action)
    {
        var route = action.Route!;
        stats.Access(exit);
        var first = _lastId + 1;
        var count = Elements(exit);
        for (var i = 0; i < count; i++)
            route.Device.Tell(new DeviceProtocol.WriteAndWait(++_lastId, action.Offset, action.Size, Element(exit, i, action.Size)), self);
        Reply = new PendingReply(ReplyKind.WaitedWrite, _lastId, exit, route, action.Offset, FirstId: first);
    }

    /// <summary>Asks the device for the (first element of the) read.</summary>
    public void Read(VmExit exit, in ExitAction action)
    {
        stats.Access(exit);
        Reply = new PendingReply(ReplyKind.DeviceRead, SendRead(action.Route!, action.Offset, action.Size), exit, action.Route, action.Offset);
    }

    /// <summary>Asks the vlapic for an RDMSR/WRMSR of one of its MSRs.</summary>
    public void ApicMsr(VmExit exit, IActorRef vlapic)
    {
        var id = ++_lastId;
        vlapic.Tell(exit is VmExit.MsrWrite w ? new VlapicProtocol.MsrWrite(id, w.Index, w.Value, w.Index == ApicMsrs.TscDeadline ? GuestTsc() : null)
            : new VlapicProtocol.MsrRead(id, ((VmExit.MsrRead)exit).Index), self);
        Reply = new PendingReply(ReplyKind.ApicMsr, id, exit);
    }

    /// <summary>The guest's TSC now (KVM_GET_MSRS of IA32_TSC, between two runs); null when KVM does not say.</summary>
    private ulong? GuestTsc()
    {
        try { return vcpu.GetMsrs(Ia32Tsc) is [{ } tsc] ? tsc.Data : null; }
        catch (KvmException) { return null; }
    }

    private const uint Ia32Tsc = 0x10;

    /// <summary>INTA: asks the 8259 for the vector of its ExtINT.</summary>
    public void Inta(IActorRef pic)
    {
        var id = ++_lastId;
        pic.Tell(new DeviceProtocol.Acknowledge(id), self);
        Reply = new PendingReply(ReplyKind.Inta, id);
    }

    /// <summary>
    /// Takes <paramref name="message"/> in if it answers <see cref="Reply"/>: completes the exit in
    /// kvm_run, asks for the next element of a string IN, or hands the 8259's vector to
    /// <paramref name="interrupts"/> (injected at once with KVM_INTERRUPT).
    /// </summary>
    public ReplyProgress Take(object message, InterruptInjector interrupts)
    {
        if (Reply is not { } reply || !reply.IsAnsweredBy(message)) return ReplyProgress.None;
        switch (message)
        {
            case DeviceProtocol.ReadResult r:
                reply.Route!.InFlight = 0; // the reply acknowledges every earlier write (FIFO)
                if (reply.Exit is VmExit.Io io)
                {
                    vcpu.CompleteIoIn(reply.Index, r.Value);
                    if (reply.Index + 1 < io.Count)
                    {
                        Reply = reply with { Index = reply.Index + 1, Id = SendRead(reply.Route, reply.Offset, io.Size) };
                        return ReplyProgress.More;
                    }
                }
                else vcpu.CompleteMmioRead(r.Value);
                break;
            case DeviceProtocol.WriteDone w:
                var ending = reply.MachineEnding || w.MachineEnding;
                if (w.Id != reply.Id)
                {
                    Reply = reply with { MachineEnding = ending }; // more elements of a string OUT to come
                    return ReplyProgress.More;
                }
                reply.Route!.InFlight = 0;
                Reply = null;
                return ending ? ReplyProgress.MachineEnding : ReplyProgress.Complete;
            case VlapicProtocol.MsrReadResult r:
                vcpu.CompleteMsrRead(r.Value, fault: !r.Ok);
                break;
            case VlapicProtocol.MsrWriteResult w:
                vcpu.CompleteMsrWrite(fault: !w.Ok);
                break;
            case DeviceProtocol.Acknowledged a:
                if (interrupts.Acknowledged(a.Vector, a.StillRequested) is { } vector) vcpu.InjectInterrupt(vector);
                break;
        }
        Reply = null;
        return ReplyProgress.Complete;
    }

    /// <summary>A device credits back <paramref name="credit"/> writes. True when the device the vcpu
    /// was blocked on has room again (or it was blocked on none).</summary>
    public bool Credit(IActorRef device, DeviceProtocol.WriteCredit credit)
    {
        if (_routesByDevice.TryGetValue(device, out var route))
            route.InFlight = Math.Max(0, route.InFlight - credit.Count);
        if (BlockedOn is { InFlight: >= DeviceProtocol.WriteWindow }) return false;
        BlockedOn = null;
        return true;
    }

    /// <summary>A read no device answers: all-ones, as on a PC's bus, for every element.</summary>
    public void CompleteUnassignedRead(VmExit exit, int size)
    {
        stats.Access(exit);
        stats.UnassignedReads++;
        var ones = AccessSize.AllOnes(size);
        if (exit is VmExit.Io io)
            for (var i = 0; i < io.Count; i++) vcpu.CompleteIoIn(i, ones);
        else
            vcpu.CompleteMmioRead(ones);
    }

    private long SendRead(DeviceRoute route, ulong offset, int size)
    {
        var id = ++_lastId;
        route.Device.Tell(new DeviceProtocol.Read(id, offset, size), self);
        return id;
    }

    private static int Elements(VmExit exit) => exit is VmExit.Io { Count: > 1, Data: not null } io ? (int)io.Count : 1;

    /// <summary>Element <paramref name="index"/>'s value: from the string's data (little-endian, as
    /// KVM lays it out in kvm_run), else the exit's one value.</summary>
    private static ulong Element(VmExit exit, int index, int size)
    {
        if (exit is not VmExit.Io { Count: > 1, Data: { } data }) return exit is VmExit.Io one ? one.Value : ((VmExit.Mmio)exit).Value;
        var bytes = data.AsSpan(index * size, size);
        return size switch
        {
            1 => bytes[0],
            2 => BinaryPrimitives.ReadUInt16LittleEndian(bytes),
            4 => BinaryPrimitives.ReadUInt32LittleEndian(bytes),
            _ => BinaryPrimitives.ReadUInt64LittleEndian(bytes),
        };
    }
}

using ActorVmm.Devices;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

public enum ExitActionKind : byte
{
    /// <summary>Nothing to do but enter the guest again.</summary>
    Reenter,
    /// <summary>Post write(s) to <see cref="ExitAction.Route"/>, then re-enter.</summary>
    PostWrite,
    /// <summary>Write to <see cref="ExitAction.Route"/> and wait for <see cref="DeviceProtocol.WriteDone"/>
    /// (a device whose writes can end the machine).</summary>
    WriteAndWait,
    /// <summary>Read from <see cref="ExitAction.Route"/>; wait for the reply before re-entering.</summary>
    Read,
    /// <summary>An unassigned read: complete with all-ones at once.</summary>
    UnassignedRead,
    /// <summary>An unassigned write: dropped.</summary>
    UnassignedWrite,
    Halt,
    /// <summary>RDMSR/WRMSR exit: not handled in user space; the guest gets #GP.</summary>
    MsrFault,
    /// <summary>RDMSR/WRMSR of a local APIC MSR: asked of the vcpu's vlapic; wait for its answer.</summary>
    ApicMsr,
    /// <summary>KVM_EXIT_IOAPIC_EOI (in-kernel local APIC): tell the vlapic the level EOI, re-enter.</summary>
    IoapicEoi,
    /// <summary>KVM_EXIT_DIRTY_RING_FULL: harvest the vcpu's dirty ring (and reset it), send the GFNs
    /// to the vmspace, re-enter.</summary>
    HarvestDirtyRing,
    /// <summary>The vcpu cannot go on: <see cref="ExitAction.StopReason"/>.</summary>
    Stop,
}

/// <summary>The decision for one exit. A struct: the hot path allocates nothing for it.</summary>
public readonly record struct ExitAction(
    ExitActionKind Kind,
    DeviceRoute? Route = null,
    ulong Offset = 0,
    int Size = 0,
    VcpuProtocol.StopReason StopReason = default,
    DeviceProtocol.Space Space = DeviceProtocol.Space.Port);

/// <summary>
/// The vcpu's xAPIC register page: <see cref="Route"/> (its vlapic) answers the 4 KiB at
/// <see cref="Base"/>, in front of every device on the MMIO bus, as a processor's local APIC
/// claims its page before the access reaches the system bus (SDM Vol 3A §10.4.1).
/// </summary>
public readonly record struct ApicPage(ulong Base, DeviceRoute Route)
{
    public const ulong Length = 0x1000;

    public bool Contains(ulong address) => address - Base < Length;
}

/// <summary>
/// Exit handling as a pure function (no thread, no actor): which bus, which device, which offset,
/// or which stop. Anything not named here is handled as "stop with an unhandled exit".
/// </summary>
public static class ExitHandler
{
    /// <summary>What the vcpu does with <paramref name="exit"/>.</summary>
    /// <param name="exit">the exit KVM_RUN returned</param>
    /// <param name="ports">the port bus: port I/O goes to the device whose range holds the port</param>
    /// <param name="mmio">the MMIO bus: an MMIO exit goes to the device whose range holds the address</param>
    /// <param name="apicMsrs">the vcpu has an emulated vlapic: IA32_APIC_BASE, IA32_TSC_DEADLINE and
    /// the x2APIC range go to it (<see cref="ExitActionKind.ApicMsr"/>)</param>
    /// <param name="apicPage">the vcpu's xAPIC page where it is decoded now; null: nowhere (no
    /// emulated APIC, or the APIC is disabled or in x2APIC mode)</param>
    public static ExitAction Decide(VmExit exit, AddressBus<DeviceRoute> ports, AddressBus<DeviceRoute> mmio, bool apicMsrs = false,
        ApicPage? apicPage = null)
    {
        switch (exit)
        {
            case VmExit.Io io:
                if (ports.TryResolve(io.Port, out var pr, out var po))
                    return new ExitAction(io.IsOut ? WriteKind(pr, pr.Window + po) : ExitActionKind.Read, pr, pr.Window + po, io.Size);
                return new ExitAction(io.IsOut ? ExitActionKind.UnassignedWrite : ExitActionKind.UnassignedRead, Size: io.Size);
            case VmExit.Mmio m when apicPage is { } page && page.Contains(m.Address):
                var ao = m.Address - page.Base;
                return new ExitAction(m.IsWrite ? WriteKind(page.Route, ao) : ExitActionKind.Read, page.Route, ao, m.Length,
                    Space: DeviceProtocol.Space.Mmio);
            case VmExit.Mmio m:
                if (mmio.TryResolve(m.Address, out var mr, out var mo))
                    return new ExitAction(m.IsWrite ? WriteKind(mr, mr.Window + mo) : ExitActionKind.Read, mr, mr.Window + mo, m.Length,
                        Space: DeviceProtocol.Space.Mmio);
                return new ExitAction(m.IsWrite ? ExitActionKind.UnassignedWrite : ExitActionKind.UnassignedRead, Size: m.Length,
                    Space: DeviceProtocol.Space.Mmio);
            case VmExit.Hlt:
                return new ExitAction(ExitActionKind.Halt);
            case VmExit.Intr or VmExit.IrqWindowOpen or VmExit.SetTpr: // (the vcpu reads CR8 after every exit)
                return new ExitAction(ExitActionKind.Reenter);
            case VmExit.IoapicEoi:
                return new ExitAction(ExitActionKind.IoapicEoi);
            case VmExit.DirtyRingFull:
                return new ExitAction(ExitActionKind.HarvestDirtyRing);
            case VmExit.MsrRead r when apicMsrs && IsApicMsr(r.Index):
                return new ExitAction(ExitActionKind.ApicMsr);
            case VmExit.MsrWrite w when apicMsrs && IsApicMsr(w.Index):
                return new ExitAction(ExitActionKind.ApicMsr);
            case VmExit.MsrRead or VmExit.MsrWrite:
                return new ExitAction(ExitActionKind.MsrFault);
            case VmExit.Shutdown:
                return Stop(VcpuProtocol.StopReason.TripleFault);
            case VmExit.InternalError:
                return Stop(VcpuProtocol.StopReason.InternalError);
            case VmExit.FailEntry:
                return Stop(VcpuProtocol.StopReason.FailEntry);
            case VmExit.SystemEvent:
                return Stop(VcpuProtocol.StopReason.SystemEvent);
            default:
                return Stop(VcpuProtocol.StopReason.UnhandledExit);
        }
    }

    /// <summary>IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC registers 0x800-0x8FF.</summary>
    public static bool IsApicMsr(uint msr) =>
        msr is Lapic.ApicMsrs.ApicBase or Lapic.ApicMsrs.TscDeadline or (>= Lapic.ApicMsrs.X2ApicFirst and <= Lapic.ApicMsrs.X2ApicLast);

    private static ExitActionKind WriteKind(DeviceRoute route, ulong offset) =>
        route.WaitsForWriteAt(offset) ? ExitActionKind.WriteAndWait : ExitActionKind.PostWrite;

    private static ExitAction Stop(VcpuProtocol.StopReason reason) => new(ExitActionKind.Stop, StopReason: reason);
}

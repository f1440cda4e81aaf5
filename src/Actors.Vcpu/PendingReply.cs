using ActorVmm.Devices;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>What a vcpu out of the guest waits for before it may enter again.</summary>
internal enum ReplyKind : byte
{
    /// <summary>A device's <see cref="DeviceProtocol.ReadResult"/> for an IN or MMIO read (one per
    /// element of a string IN, asked for one after the other).</summary>
    DeviceRead,
    /// <summary>A device's <see cref="DeviceProtocol.WriteDone"/> for every element of a write whose
    /// device can end the machine.</summary>
    WaitedWrite,
    /// <summary>The vlapic's answer to an RDMSR/WRMSR of an APIC MSR (a refusal is a #GP).</summary>
    ApicMsr,
    /// <summary>The 8259's vector for an ExtINT (INTA, <see cref="DeviceProtocol.Acknowledged"/>).</summary>
    Inta,
}

/// <summary>
/// The one reply a vcpu waits for (at most one at a time: the vcpu is out of the guest until it is
/// in). Ids are the vcpu's correlation ids: <see cref="Id"/> the last one sent, <see cref="FirstId"/>
/// the first of a string OUT's elements. <see cref="Exit"/> is the exit the reply completes in
/// kvm_run; <see cref="Route"/> and <see cref="Offset"/> name the device (and the next element of a
/// string IN, <see cref="Index"/>); <see cref="MachineEnding"/> records an element of a waited write
/// that ended the machine. A struct: a device read allocates nothing for it.
/// </summary>
internal readonly record struct PendingReply(
    ReplyKind Kind,
    long Id,
    VmExit? Exit = null,
    DeviceRoute? Route = null,
    ulong Offset = 0,
    long FirstId = 0,
    int Index = 0,
    bool MachineEnding = false)
{
    /// <summary>Whether <paramref name="message"/> is (part of) this reply; anything else is stale
    /// (an earlier exit's) or not a reply.</summary>
    public bool IsAnsweredBy(object message) => message switch
    {
        DeviceProtocol.ReadResult r => Kind == ReplyKind.DeviceRead && r.Id == Id,
        DeviceProtocol.WriteDone w => Kind == ReplyKind.WaitedWrite && w.Id >= FirstId && w.Id <= Id,
        VlapicProtocol.MsrReadResult r => Kind == ReplyKind.ApicMsr && r.Id == Id && Exit is VmExit.MsrRead,
        VlapicProtocol.MsrWriteResult w => Kind == ReplyKind.ApicMsr && w.Id == Id && Exit is VmExit.MsrWrite,
        DeviceProtocol.Acknowledged a => Kind == ReplyKind.Inta && a.Id == Id,
        _ => false,
    };

    /// <summary>A reply to some request of this vcpu's, current or stale.</summary>
    public static bool IsReply(object message) =>
        message is DeviceProtocol.ReadResult or DeviceProtocol.WriteDone or VlapicProtocol.MsrReadResult
            or VlapicProtocol.MsrWriteResult or DeviceProtocol.Acknowledged;
}

using System.Buffers.Binary;
using System.Collections.Immutable;
using ActorVmm.Devices;

namespace ActorVmm.Lapic;

/// <summary>
/// The kernel's half of the assisted layer (the seed's vmm_ops for a hardware-assisted vlapic):
/// local APICs that live in KVM (split irqchip). Implemented by the host over the VM's KVM fd; this
/// project stays free of KVM. Both calls may come from any thread and never block on a vcpu.
/// </summary>
public interface IKernelApicBus
{
    /// <summary>KVM_SIGNAL_MSI: one interrupt message to the in-kernel APICs, which match its
    /// destination and arbitrate lowest priority themselves. False: no APIC took it.</summary>
    bool SignalMsi(ulong address, uint data);

    /// <summary>The level-triggered messages whose EOIs user space must see (KVM_SET_GSI_ROUTING
    /// over the IOAPIC's reserved routes; an EOI of a vector they name exits as KVM_EXIT_IOAPIC_EOI).
    /// Replaces the previous set; at most <see cref="MsiEncoding.IoApicRoutes"/> entries.</summary>
    void SetLevelRoutes(IReadOnlyList<(ulong Address, uint Data)> routes);
}

/// <summary>The interrupt message format of the APIC bus as memory writes (SDM Vol 3A §10.11).</summary>
public static class MsiEncoding
{
    /// <summary>GSI routes reserved for the IOAPIC's pins.</summary>
    public const int IoApicRoutes = 24;

    /// <summary>0xFEE00000 | destination ID in bits 19:12 | destination mode in bit 2.</summary>
    public static ulong Address(uint destination, DestinationMode mode) =>
        0xFEE0_0000UL | ((ulong)(destination & 0xFF) << 12) | (mode == DestinationMode.Logical ? 1UL << 2 : 0);

    /// <summary>Vector in bits 7:0, delivery mode 10:8, level (assert) 14, trigger mode 15.</summary>
    public static uint Data(byte vector, DeliveryMode mode, bool level, TriggerMode trigger) =>
        vector | ((uint)mode << 8) | (level ? 1u << 14 : 0) | (trigger == TriggerMode.Level ? 1u << 15 : 0);
}

/// <summary>
/// The hardware assist of a vcpu's local APIC in the kernel (KVM split irqchip): registers, timer,
/// priorities, IPIs and INIT/SIPI are KVM's; what stays in user space is what the kernel hands
/// back. A delivery is an MSI to this APIC; the kernel injects by itself (no <c>InterruptPending</c>,
/// no kick: the posted-interrupt style); LINT0 asks the vcpu to fetch the 8259's vector (ExtINT
/// goes in with KVM_INTERRUPT, which KVM accepts only while the kernel APIC's LVT LINT0 lets ExtINT
/// through) and LINT1 is an NMI. The state lives in the kernel: the vlapic actor asks its vcpu,
/// which alone may issue KVM_GET_LAPIC between two runs (<see cref="VlapicProtocol.ReadKernelLapic"/>),
/// and converts it with <see cref="StateFromKernel"/> and <see cref="KernelImage"/>.
/// </summary>
public sealed class KvmAssistedLapicBackend : ILapicAssist
{
    private readonly IKernelApicBus _bus;
    private readonly IInterruptLine _lint0;
    private readonly IInterruptLine _lint1;

    public KvmAssistedLapicBackend(int vcpuId, IKernelApicBus bus, ILapicEvents events)
    {
        ApicId = (uint)vcpuId;
        _bus = bus;
        _lint0 = new EdgeEventLine(() => events.VcpuEvent(VcpuEventKind.ExtInt, 0));
        _lint1 = new EdgeEventLine(() => events.VcpuEvent(VcpuEventKind.Nmi, 0));
    }

    public uint ApicId { get; }

    /// <summary>KVM_SIGNAL_MSI, physical destination: this APIC.</summary>
    public void SetIntrReady(DeliveryMode mode, byte vector, bool level, TriggerMode trigger) =>
        _bus.SignalMsi(MsiEncoding.Address(ApicId, DestinationMode.Physical), MsiEncoding.Data(vector, mode, level, trigger));

    public IInterruptLine Lint(int pin) => pin == 0 ? _lint0 : _lint1;

    /// <summary>An edge on a LINT pin raises its event; the vcpu's INTA finds out whether the 8259
    /// still requests, so a deassert needs nothing.</summary>
    private sealed class EdgeEventLine(Action raise) : IInterruptLine
    {
        public void Assert() => raise();

        public void Deassert()
        {
        }

        public void Pulse() => raise();
    }

    /// <summary>
    /// A snapshot of an in-kernel APIC in the Apic Page form: KVM's 1 KiB register image has the
    /// page's offsets (SDM Table 10-1); the rest of the 4 KiB page is zero. The timer runs in the
    /// kernel: its Current Count is in the image, and no user-space timer state exists.
    /// KVM's image holds the APIC ID in bits 31:24 even in x2APIC mode (ActorVmm does not enable
    /// KVM_X2APIC_API_USE_32BIT_IDS); the page holds it as the guest reads it, the 32-bit x2APIC ID
    /// in x2APIC mode (§10.12.5.1), so it is moved here and back in <see cref="KernelImage"/>.
    /// </summary>
    public static LapicState StateFromKernel(ReadOnlySpan<byte> registers, ulong apicBase, ulong tscDeadline)
    {
        var page = new byte[LocalApic.PageSize];
        registers[..Math.Min(registers.Length, page.Length)].CopyTo(page);
        var id = BinaryPrimitives.ReadUInt32LittleEndian(page.AsSpan(ApicOffsets.Id)) >> 24;
        if ((apicBase & LocalApic.BaseExtd) != 0) BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(ApicOffsets.Id), id);
        return new LapicState(ImmutableArray.Create(page), id, apicBase, EsrPending: 0,
            TimerArmed: false, TimerStart: TimeSpan.Zero, TimerCountOffset: 0, TimerPeriods: 0, tscDeadline,
            Lint0Level: false, Lint1Level: false);
    }

    /// <summary>The first <paramref name="size"/> bytes of the page in KVM's form (KVM_SET_LAPIC): the
    /// APIC ID back in bits 31:24 for an x2APIC-mode state (see <see cref="StateFromKernel"/>).</summary>
    public static byte[] KernelImage(LapicState state, int size)
    {
        var image = state.ApicPage.AsSpan(0, size).ToArray();
        if ((state.ApicBase & LocalApic.BaseExtd) != 0)
            BinaryPrimitives.WriteUInt32LittleEndian(image.AsSpan(ApicOffsets.Id), state.ApicId << 24);
        return image;
    }
}

using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Lapic;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;

namespace ActorVmm.Host.Vm;

/// <summary>How the local APICs of a VM are provided (config <c>actorvmm.vm.lapic</c>).</summary>
public enum LapicMode
{
    /// <summary>Vlapic actors (<see cref="LapicBackends.Emulated"/>): MMIO and MSR exits, KVM_INTERRUPT.</summary>
    Emulated,
    /// <summary>KVM's split irqchip (<see cref="LapicBackends.KvmAssisted"/>): local APICs, their timers,
    /// IPIs and INIT/SIPI in the kernel; the IOAPIC, 8259s and other devices stay actors; the IOAPIC's
    /// messages go in as MSIs and level EOIs come back as exits.</summary>
    Assisted,
}

/// <summary>Everything needed to build one VM, already validated (see <see cref="Config.VmConfig"/>).</summary>
/// <param name="SharedMemory">a shared-memory device (passthru-style: its window is host memory
/// mapped as a memslot); a VM with one wires all guest memory and cannot demand-page</param>
/// <param name="TestDevices">QEMU's test devices for conformance suites (<see cref="PcPlatform.TestDevice"/>,
/// next to the debug-exit port every VM has); off by default</param>
/// <param name="Name">the VM's name</param>
/// <param name="MemoryBytes">guest RAM</param>
/// <param name="Cpus">the number of vcpus; vcpu 0 boots</param>
/// <param name="Boot">what the VM boots</param>
/// <param name="Lapic">where the local APICs live</param>
/// <param name="Paging">the vmspace's paging; null: guest RAM all resident, no userfaultfd</param>
/// <param name="Superpages">back guest RAM with transparent huge pages where the host allows it (not with demand paging through userfaultfd, which fills 4 KiB pages)</param>
public sealed record VmSpec(string Name, ulong MemoryBytes, int Cpus, BootImage Boot, LapicMode Lapic = LapicMode.Emulated,
    ActorVmm.Memory.VmspaceOptions? Paging = null, bool Superpages = true, SharedMemorySpec? SharedMemory = null,
    bool TestDevices = false)
{
    public const int MaxCpus = 16;

    /// <summary>A virtio entropy device at PCI 00:01.0 (<c>--rng</c>, <c>actorvmm.vm.rng</c>; <see cref="PcPlatform.VirtioRng"/>).</summary>
    public bool Rng { get; init; }

    /// <summary>A virtio network card at PCI 00:04.0 on an existing TAP interface (<c>--net tap=NAME</c>,
    /// <c>actorvmm.vm.net</c>; <see cref="PcPlatform.VirtioNet"/>); null: none.</summary>
    public NetSpec? Net { get; init; }

    /// <summary>A virtio block device at PCI 00:02.0 backed by a host file (<c>--disk FILE[,ro]</c>,
    /// <c>actorvmm.vm.disk</c>; <see cref="PcPlatform.VirtioBlk"/>); null: none.</summary>
    public DiskSpec? Disk { get; init; }

    /// <summary>A virtio console at PCI 00:03.0 on the VM's console (<c>--virtio-console</c>,
    /// <c>actorvmm.vm.virtio-console</c>; <see cref="PcPlatform.VirtioConsole"/>).</summary>
    public bool VirtioConsole { get; init; }

    /// <summary>The VM has a device that reads and writes guest RAM itself (virtio queues through the
    /// host view of guest memory), which rules out demand paging and makes a restore eager.</summary>
    public bool HasGuestMemoryDevices => Rng || Disk is not null || VirtioConsole || Net is not null;

    /// <summary>The CPUID features the vcpus see (<c>--cpu</c>, <c>actorvmm.vm.cpu</c>).</summary>
    public CpuModel Cpu { get; init; } = CpuModel.Host;

    /// <summary>Devices that run on another host node of the cluster, by name: HOST:PORT of the node
    /// (<c>actorvmm.vm.devices.NAME.node</c>, <c>ctl run --device-node NAME=HOST:PORT</c>).</summary>
    public IReadOnlyDictionary<string, string> DeviceNodes { get; init; } = new Config.SettingsMap();
}

/// <summary>
/// The VM's network card: the TAP interface <see cref="Tap"/>, which must exist in the host process's
/// network namespace (<c>ip tuntap add NAME mode tap</c>; the VM attaches, never creates), and the card's
/// address <see cref="Mac"/> (unicast).
/// </summary>
public sealed record NetSpec(string Tap, MacAddress Mac)
{
    /// <summary>The address of a card given none: 52:54:00 (the prefix QEMU's cards use) and three bytes
    /// of the SHA-256 of the VM's name, so each VM keeps its address from run to run and VMs with different
    /// names on one bridge differ (most likely).</summary>
    public static MacAddress DefaultMac(string vmName)
    {
        var hash = System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(vmName));
        return new MacAddress(0x52_54_00UL << 24 | (ulong)hash[0] << 16 | (ulong)hash[1] << 8 | hash[2]);
    }
}

/// <summary>
/// The shared-memory device (like QEMU's ivshmem, without PCI): <see cref="Size"/> bytes of host
/// memory at guest-physical <see cref="Platform.SharedMemoryBase"/>, backed by the file at
/// <see cref="Path"/> (null: an anonymous memfd, reachable only through <see cref="RunningVm.SharedMemory"/>).
/// <see cref="Size"/> null: the file's own length; otherwise a missing file is created, a shorter one extended.
/// </summary>
public sealed record SharedMemorySpec(string? Path, ulong? Size)
{
    public static SharedMemorySpec Anonymous(ulong size) => new(null, size);

    internal SharedMemoryRegion Open() =>
        Path is null ? SharedMemoryRegion.Anonymous("shm", Size ?? 0) : SharedMemoryRegion.OpenFile(Path, Size);
}

/// <summary>
/// The host file behind the VM's virtio block device: <see cref="Path"/> opened for reading and writing,
/// or for reading only with <see cref="ReadOnly"/> (the device then offers VIRTIO_BLK_F_RO and fails
/// every write). The file must exist; the disk is its whole 512-byte sectors.
/// </summary>
public sealed record DiskSpec(string Path, bool ReadOnly = false);

/// <summary>One more bus range of a device, seen by the device at offset <paramref name="Window"/> + (address - base).</summary>
public sealed record DeviceRange(DeviceProtocol.Space Space, ulong Base, ulong Length, ulong Window);

/// <summary>A device on a bus: name, address space, base, length, how to build its model, and
/// (for <see cref="IStatefulDevice"/> models) how to rebuild it from its saved state after a crash.
/// A device may own more ranges (<see cref="MoreRanges"/>): each range reaches the same actor at
/// its own offset window, so the model tells them apart. A model wired to the VM's interrupt
/// controllers is built from a <see cref="DeviceContext"/> (<see cref="Wired"/>); a
/// <see cref="Timed"/> one gets a timer on the VM's one clock (<see cref="TimedDeviceProtocol"/>).</summary>
public sealed record DeviceSpec(string Name, DeviceProtocol.Space Space, ulong Base, ulong Length,
    Func<IPlatformEvents, IBusDevice> Factory, Func<IPlatformEvents, object, IBusDevice>? Restore = null)
{
    /// <summary>The offset window of the first range (<see cref="Base"/>).</summary>
    public ulong Window { get; init; }

    public IReadOnlyList<DeviceRange> MoreRanges { get; init; } = [];

    /// <summary>Vcpus wait for each write instead of posting it: for devices whose writes can end
    /// the machine (debug-exit, the i8042 reset line), so the guest runs nothing after such a write.</summary>
    public bool WaitForWrites { get; init; }

    /// <summary>When set, builds the model instead of <see cref="Factory"/>.</summary>
    public Func<DeviceContext, IBusDevice>? WiredFactory { get; init; }

    /// <summary>When set, rebuilds the model after a crash instead of <see cref="Restore"/>.</summary>
    public Func<DeviceContext, object, IBusDevice>? WiredRestore { get; init; }

    /// <summary>Offsets (window included) whose writes the vcpus wait for even though
    /// <see cref="WaitForWrites"/> is off: writes whose effect beyond the device must precede the
    /// guest's next instruction.</summary>
    public Func<ulong, bool>? WaitForWriteAt { get; init; }

    /// <summary>The model is an <see cref="ITimedDevice"/> on the VM's clock.</summary>
    public bool Timed { get; init; }

    /// <summary>The device is a function on PCI bus 0 whose configuration space its own actor serves
    /// (the host bridge passes mechanism #1 accesses on to it); null: not a PCI function.</summary>
    public ActorVmm.Devices.Pci.PciRemoteFunction? PciFunction { get; init; }

    /// <summary>The device can run on another host node than its VM (<c>actorvmm.vm.devices.NAME.node</c>);
    /// null: it runs beside its VM only.</summary>
    public HostableDevice? Hostable { get; init; }

    /// <summary>Every range of the device, the first one included.</summary>
    public IEnumerable<DeviceRange> Ranges => [new DeviceRange(Space, Base, Length, Window), .. MoreRanges];

    /// <summary>A device whose model needs the VM's interrupt wiring (IRQ lines, the APIC bus, the clock).</summary>
    public static DeviceSpec Wired(string name, DeviceProtocol.Space space, ulong @base, ulong length,
        Func<DeviceContext, IBusDevice> factory, Func<DeviceContext, object, IBusDevice>? restore = null) =>
        new(name, space, @base, length, _ => throw new InvalidOperationException($"device {name} needs the VM's wiring"))
        {
            WiredFactory = factory,
            WiredRestore = restore,
        };
}

/// <summary>How a device runs on another host node: the kind of model that node builds
/// (<see cref="PcPlatform.HostableModel"/>) and where its output goes on the VM's node.</summary>
public sealed record HostableDevice(string Kind, Action<byte> Output);

/// <summary>
/// What a wired device model gets from the VM it is built in: the platform events of its actor,
/// ISA IRQ lines (each verb a message to the IOAPIC and the 8259), the APIC bus (the IPI router:
/// the IOAPIC's output), the 8259's INTR output (LINT0 of vcpu 0's vlapic) and the VM's clock.
/// The lines only tell messages, so a model may use them from inside Read/Write.
/// </summary>
public sealed class DeviceContext(IPlatformEvents events, VmInterrupts interrupts, IDeviceClock clock, IGuestMemory? memory = null,
    IActorRef? vm = null)
{
    public IPlatformEvents Events { get; } = events;
    public IDeviceClock Clock { get; } = clock;

    /// <summary>Guest memory (its host view), for a device that reads and writes guest RAM (virtio
    /// queues). Throws for a context built without it.</summary>
    public IGuestMemory Memory => memory ?? throw new InvalidOperationException("this device context has no guest memory");

    /// <summary>IOAPIC pin <paramref name="pin"/> (0-23) alone, told without a barrier: for sources whose
    /// changes need not precede the guest's next instruction (a PCI function's INTx#).</summary>
    public IInterruptLine IoApicPin(int pin) => interrupts.IoApicInput(pin);

    /// <summary>
    /// Where the device's range at offset window <paramref name="window"/> now decodes (null: nowhere),
    /// asked of the VM (<see cref="VmProtocol.MapDeviceMmio"/>), which moves it on every vcpu's MMIO
    /// bus; a write the vcpu waits for completes only after that (<see cref="IDeviceRequests"/>).
    /// </summary>
    public void MapMmio(string device, ulong window, ulong length, ulong? @base)
    {
        if (vm is null || Events is not IDeviceRequests requests) return;
        requests.Send(vm, id => new VmProtocol.MapDeviceMmio(id, device, window, length, @base));
    }

    /// <summary>ISA IRQ <paramref name="irq"/> (0-15): IOAPIC pin irq (IRQ 0: pin 2, the MADT's
    /// interrupt source override) and 8259 input irq (none for the cascade IRQ 2).</summary>
    public IInterruptLine IsaIrq(int irq) => interrupts.IsaIrq(irq);

    /// <summary>
    /// <see cref="IsaIrq"/> for a device whose writes to it the vcpus wait for
    /// (<see cref="DeviceSpec.WaitForWriteAt"/>): each change is followed by a barrier
    /// (<see cref="DeviceProtocol.Sync"/>) to the IOAPIC and the 8259, and the waited write is answered
    /// only once both have handled the change. Their outputs reach the local APICs on their own thread
    /// (the vlapics and the router run on their senders' threads, KVM's APICs take an MSI in the
    /// ioctl), so by then the interrupt is normally pending at the vcpu, as it is at the end of an OUT
    /// on QEMU.
    /// </summary>
    public IInterruptLine SyncedIsaIrq(int irq) => interrupts.IsaIrq(irq, Events as IDeviceRequests);

    /// <summary>IOAPIC pin <paramref name="pin"/> (0-23) alone, with no 8259 input (the PCI-style pins
    /// 16-23), synced like <see cref="SyncedIsaIrq"/>.</summary>
    public IInterruptLine SyncedIoApicPin(int pin) => interrupts.IoApicInput(pin, Events as IDeviceRequests);

    public IApicBus ApicBus => interrupts.ApicBus;

    public IInterruptLine PicIntr => interrupts.PicIntr;
}

/// <summary>
/// The actor refs interrupts travel between, for one VM: filled in by the VM actor as it creates
/// the router, the vlapics and the controllers, before any device can raise a line (refs are read
/// when a line is used, so a line never holds a stale one). Local, never sent.
/// </summary>
public sealed class VmInterrupts
{
    private volatile IActorRef _ioApic = ActorRefs.Nobody;
    private volatile IActorRef _pic = ActorRefs.Nobody;
    private volatile IActorRef _router = ActorRefs.Nobody;
    private volatile IActorRef _bspVlapic = ActorRefs.Nobody;

    public IActorRef IoApic { get => _ioApic; set => _ioApic = value; }
    public IActorRef Pic { get => _pic; set => _pic = value; }
    public IActorRef Router { get => _router; set => _router = value; }
    public IActorRef BspVlapic { get => _bspVlapic; set => _bspVlapic = value; }

    /// <summary>IOAPIC pin of ISA IRQ <paramref name="irq"/>: identity, except IRQ 0 → pin 2.</summary>
    public static int IoApicPin(int irq) => irq == Platform.PitIrq ? (int)Platform.PitGsi : irq;

    /// <param name="requests">the driving device actor's requests, when its writes wait for the
    /// change (see <see cref="DeviceContext.SyncedIsaIrq"/>): each change is followed by a
    /// <see cref="DeviceProtocol.Sync"/> to both controllers; null: changes are only told</param>
    /// <param name="irq">ISA IRQ 0-15</param>
    public IInterruptLine IsaIrq(int irq, IDeviceRequests? requests = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(irq);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(irq, 16);
        var pin = IoApicPin(irq);
        return new DelegateInterruptLine(
            () => Level(pin, irq, true, requests),
            () => Level(pin, irq, false, requests),
            () =>
            {
                IoApic.Tell(new DeviceProtocol.PulseIrq(pin), Sender);
                Pic.Tell(new DeviceProtocol.PulseIrq(irq), Sender);
                SyncWith(requests, IoApic);
                SyncWith(requests, Pic);
            });
    }

    /// <summary>IOAPIC pin <paramref name="pin"/> (0-23) alone, with no 8259 input: for sources wired
    /// to the IOAPIC only, as PCI interrupts are to pins 16-23.</summary>
    /// <param name="requests">as for <see cref="IsaIrq"/></param>
    /// <param name="pin">IOAPIC input 0-23</param>
    public IInterruptLine IoApicInput(int pin, IDeviceRequests? requests = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pin);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(pin, Platform.IoApicPins);
        return new DelegateInterruptLine(
            () => PinLevel(pin, true, requests),
            () => PinLevel(pin, false, requests),
            () =>
            {
                IoApic.Tell(new DeviceProtocol.PulseIrq(pin), Sender);
                SyncWith(requests, IoApic);
            });
    }

    private void Level(int pin, int irq, bool level, IDeviceRequests? requests)
    {
        IoApic.Tell(new DeviceProtocol.SetIrqLevel(pin, level), Sender);
        Pic.Tell(new DeviceProtocol.SetIrqLevel(irq, level), Sender);
        SyncWith(requests, IoApic);
        SyncWith(requests, Pic);
    }

    private void PinLevel(int pin, bool level, IDeviceRequests? requests)
    {
        IoApic.Tell(new DeviceProtocol.SetIrqLevel(pin, level), Sender);
        SyncWith(requests, IoApic);
    }

    /// <summary>A barrier behind the change just told to <paramref name="controller"/> (same sender, so
    /// mailbox order puts it after); none to a controller the VM does not have.</summary>
    private static void SyncWith(IDeviceRequests? requests, IActorRef controller)
    {
        if (requests is null || controller.IsNobody()) return;
        requests.Send(controller, id => new DeviceProtocol.Sync(id));
    }

    /// <summary>The actor whose model raises a line or sends an APIC message now (these run inside
    /// its message handling), so that the message carries it and a trace links it to its cause.</summary>
    private static IActorRef Sender => ActorCell.GetCurrentSelfOrNoSender();

    public IApicBus ApicBus => new RouterBus(this);

    /// <summary>The 8259's INTR: LINT0 of the BSP's vlapic (virtual wire).</summary>
    public IInterruptLine PicIntr => new DelegateInterruptLine(
        () => Lint(VlapicProtocol.PinChange.Assert),
        () => Lint(VlapicProtocol.PinChange.Deassert),
        () => Lint(VlapicProtocol.PinChange.Pulse));

    private void Lint(VlapicProtocol.PinChange change) =>
        BspVlapic.Tell(new VlapicProtocol.Lint(0, change), Sender);

    private sealed class RouterBus(VmInterrupts interrupts) : IApicBus
    {
        public void Deliver(ApicMessage m) => interrupts.Router.Tell(m, Sender);
    }
}

/// <summary>The KVM resources of one VM, owned by its <see cref="RunningVm"/>; local, never sent.</summary>
/// <param name="Clock">the one clock of the VM's timers (PIT, RTC, LAPIC timers); null: a new <see cref="MonotonicClock"/></param>
/// <param name="Lapic">the local APIC backend of every vcpu; null: no local APICs (no vlapic actors, no router)</param>
/// <param name="KernelApic">the in-kernel local APICs (split irqchip), with <see cref="LapicBackends.KvmAssisted"/></param>
/// <param name="DirtyLog">the VM's KVM dirty log, for a vmspace with <c>dirty-tracking = dirty-log</c></param>
/// <param name="Name">the VM's name</param>
/// <param name="Memory">guest RAM, mapped and registered</param>
/// <param name="Vcpus">the KVM vcpus, index = vcpu id</param>
/// <param name="Devices">the devices and where they sit on the buses</param>
/// <param name="Traced">record the message trace</param>
/// <param name="Paging">the vmspace's paging; null: none</param>
/// <param name="FaultInjection">the VM takes fault-injection messages (ctl fault, tests)</param>
internal sealed record VmResources(string Name, GuestMemoryMap Memory, IReadOnlyList<IVcpu> Vcpus,
    IReadOnlyList<DeviceSpec> Devices, bool Traced, IDeviceClock? Clock = null, LapicBackendFactory? Lapic = null,
    ActorVmm.Memory.VmspaceOptions? Paging = null, bool FaultInjection = false, IKernelApicBus? KernelApic = null,
    IDirtyLog? DirtyLog = null)
{
    /// <summary>The devices' wiring; <see cref="VmBuilder"/> sets the one it checked against guest
    /// memory, a VM built without it gets <see cref="Devices"/> planned alone.</summary>
    public VmWiring Wiring { get; init; } = VmWiring.Plan(Devices);

    /// <summary>What the VM was built from: a VM without it cannot be snapshotted.</summary>
    public VmSpec? Spec { get; init; }

    /// <summary>The VM's KVM handle, for its VM-wide state (the kvmclock) in a snapshot; null in tests
    /// that build the actors without KVM.</summary>
    public VmHandle? Kvm { get; init; }

    /// <summary>The states a restored VM's actors start from; null: a VM that boots.</summary>
    public RestoredStates? Restore { get; init; }
}

/// <summary>The states a VM's actors start from when it is restored from a snapshot: each vcpu's,
/// each emulated vlapic's (none under <c>lapic = assisted</c>) and each device's state record by name.</summary>
internal sealed record RestoredStates(IReadOnlyList<ActorVmm.Vcpu.VcpuSnapshot> Vcpus, IReadOnlyList<LapicState> Vlapics,
    IReadOnlyDictionary<string, object> Devices);

/// <summary>The in-kernel local APICs of one VM, over its KVM fd (KVM_SIGNAL_MSI, KVM_SET_GSI_ROUTING).</summary>
internal sealed class KvmApicBus(VmHandle vm) : IKernelApicBus
{
    public bool SignalMsi(ulong address, uint data) => vm.SignalMsi(address, data);

    public void SetLevelRoutes(IReadOnlyList<(ulong Address, uint Data)> routes) =>
        vm.SetMsiRoutes([.. routes.Select((r, i) => new VmHandle.MsiRoute((uint)i, r.Address, r.Data))]);
}

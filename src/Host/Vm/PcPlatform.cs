using ActorVmm.Devices;
using ActorVmm.Devices.Pci;
using ActorVmm.Devices.Virtio;

namespace ActorVmm.Host.Vm;

/// <summary>
/// The interrupt controllers and timers of the ActorVmm PC (addresses in <see cref="Platform"/>):
/// IOAPIC (MMIO 0xFEC00000, its output on the APIC bus), the 8259 pair (0x20, 0xA0, ELCR 0x4D0:
/// one actor, three offset windows), the 8254 PIT (0x40-0x43 and port 0x61: one actor, two
/// windows; IRQ 0) and the CMOS RTC (0x70-0x71, IRQ 8); the reset and power registers (port 0x92,
/// 0xCF9, the ACPI PM block at 0x600). The VM actor finds the IOAPIC and the PIC by their names,
/// <see cref="IoApicName"/> and <see cref="PicName"/>.
/// </summary>
public static class PcPlatform
{
    public const string IoApicName = "ioapic";
    public const string PicName = "pic";
    public const string PitName = "pit";
    public const string RtcName = "rtc";
    public const string Port92Name = "port92";
    public const string ResetControlName = "reset-control";
    public const string AcpiPmName = "acpi-pm";
    public const string PciName = "pci";

    /// <summary>The IOAPIC's ID: after the vcpus' APIC IDs where its 4-bit register allows (the MP
    /// table and MADT say the same). With 16 vcpus every 4-bit number is a CPU's: it wraps to 0, as the
    /// register would; IOAPIC and local APIC IDs have not shared a bus since the xAPIC.</summary>
    public static byte IoApicId(int cpus) => (byte)(cpus & 0xF);

    /// <param name="biosLikePic">initialise the 8259s as a BIOS does (vector bases 0x08/0x70, all
    /// IRQs masked): for images that are not firmware (a firmware does it itself)</param>
    /// <param name="cpus">the number of vcpus (the IOAPIC's ID follows their APIC IDs)</param>
    public static IEnumerable<DeviceSpec> InterruptControllersAndTimers(int cpus, bool biosLikePic)
    {
        var ioapicId = IoApicId(cpus);
        yield return DeviceSpec.Wired(IoApicName, DeviceProtocol.Space.Mmio, Platform.IoApicBase, Platform.IoApicLength,
            c => new IoApic(c.ApicBus, ioapicId),
            (c, state) => IoApic.FromState((IoApicState)state, c.ApicBus));

        yield return DeviceSpec.Wired(PicName, DeviceProtocol.Space.Port, Platform.PicMasterPort, Platform.PicLength,
            c => biosLikePic ? new PicDevice(c.PicIntr).InitialiseLikeBios() : new PicDevice(c.PicIntr),
            (c, state) => PicDevice.FromState((PicState)state, c.PicIntr)) with
        {
            Window = PicDevice.MasterWindow,
            MoreRanges =
            [
                new DeviceRange(DeviceProtocol.Space.Port, Platform.PicSlavePort, Platform.PicLength, PicDevice.SlaveWindow),
                new DeviceRange(DeviceProtocol.Space.Port, Platform.ElcrPort, Platform.ElcrLength, PicDevice.ElcrWindow),
            ],
        };

        yield return DeviceSpec.Wired(PitName, DeviceProtocol.Space.Port, Platform.PitPort, Platform.PitLength,
            c => new PitDevice(new Pit8254(c.Clock, c.IsaIrq(Platform.PitIrq))),
            (c, state) => new PitDevice(Pit8254.FromState((PitState)state, c.Clock, c.IsaIrq(Platform.PitIrq)))) with
        {
            Window = PitDevice.CounterWindow,
            MoreRanges =
            [
                new DeviceRange(DeviceProtocol.Space.Port, Platform.SystemControlPortB, Platform.SystemControlPortBLength,
                    PitDevice.SpeakerWindow),
            ],
            Timed = true,
        };

        yield return DeviceSpec.Wired(RtcName, DeviceProtocol.Space.Port, Platform.RtcPort, Platform.RtcLength,
            c => new CmosRtc(() => DateTime.UtcNow, c.Clock, c.IsaIrq(Platform.RtcIrq)),
            (c, state) => CmosRtc.FromState((CmosRtcState)state, () => DateTime.UtcNow, c.Clock, c.IsaIrq(Platform.RtcIrq))) with
        {
            Timed = true,
        };
    }

    /// <summary>
    /// The chipset's reset and power registers, part of every PC (addresses in <see cref="Platform"/>):
    /// System Control Port A (0x92: fast reset, A20), the reset control register (0xCF9: the FADT's
    /// RESET_REG) and the ACPI PM block (0x600-0x60B: PM1a event and control, PM timer) that the FADT
    /// describes. Each can end the machine with a write (reset, S5 power-off), so vcpus wait for
    /// their writes; reads (the PM timer's loop) are not held up by that.
    /// </summary>
    public static IEnumerable<DeviceSpec> ResetAndPowerManagement()
    {
        yield return new DeviceSpec(Port92Name, DeviceProtocol.Space.Port, Platform.SystemControlPortA, Platform.SystemControlPortALength,
            events => new SystemControlPortA(events),
            (events, state) => SystemControlPortA.FromState((SystemControlPortAState)state, events))
        {
            WaitForWrites = true,
        };

        yield return new DeviceSpec(ResetControlName, DeviceProtocol.Space.Port, Platform.ResetControlPort, Platform.ResetControlLength,
            events => new ResetControl(events),
            (events, state) => ResetControl.FromState((ResetControlState)state, events))
        {
            WaitForWrites = true,
        };

        yield return DeviceSpec.Wired(AcpiPmName, DeviceProtocol.Space.Port, Platform.AcpiPmBase, Platform.AcpiPmLength,
            c => new AcpiPm(c.Clock, c.Events),
            (c, state) => AcpiPm.FromState((AcpiPmState)state, c.Clock, c.Events)) with
        {
            WaitForWrites = true,
        };
    }

    /// <summary>
    /// The PCI host bridge (<see cref="PciHostBridge"/>): bus 0's configuration space through mechanism #1
    /// (CONFIG_ADDRESS, a dword at 0xCF8: one port here, so 0xCF9 stays the reset register, and a dword
    /// access starting at 0xCF8 still reaches the bridge; CONFIG_DATA at 0xCFC-0xCFF) and through ECAM
    /// (<see cref="Platform.PciEcamBase"/>, bus 0's 1 MiB). Function 00:00.0 is the bridge itself.
    /// </summary>
    /// <remarks>
    /// A function that is a device actor of its own (<paramref name="functions"/>, e.g.
    /// <see cref="VirtioRng"/>) has its 4 KiB ECAM page routed straight to its actor: the bridge's ECAM
    /// range is cut around those pages. Its configuration accesses through CONFIG_DATA reach the bridge,
    /// which passes them on to the function's actor (<see cref="PciHostBridge.TryForward"/>); vcpus wait
    /// for CONFIG_DATA writes, so a BAR the guest moves through them is moved on every vcpu's bus
    /// before its next instruction (the function's actor answers the write once it is).
    /// </remarks>
    public static DeviceSpec PciHost(IReadOnlyList<PciRemoteFunction>? functions = null)
    {
        var remote = functions ?? [];
        return new(PciName, DeviceProtocol.Space.Port, Platform.PciConfigAddressPort, 1, _ => new PciHostBridge(remote: remote),
            (_, state) => PciHostBridge.FromState((PciHostBridgeState)state, remote))
        {
            Window = PciHostBridge.ConfigAddressWindow,
            MoreRanges =
            [
                new DeviceRange(DeviceProtocol.Space.Port, Platform.PciConfigDataPort, PciHostBridge.ConfigDataLength, PciHostBridge.ConfigDataWindow),
                .. EcamRangesAround(remote),
            ],
            WaitForWriteAt = offset => offset - PciHostBridge.ConfigDataWindow < PciHostBridge.ConfigDataLength,
        };
    }

    /// <summary>The bridge's part of the ECAM window: all of bus 0's 1 MiB but the pages of <paramref name="remote"/>.</summary>
    private static IEnumerable<DeviceRange> EcamRangesAround(IReadOnlyList<PciRemoteFunction> remote)
    {
        ulong at = 0;
        foreach (var page in remote.Select(EcamPageOffset).Order())
        {
            if (page > at) yield return new DeviceRange(DeviceProtocol.Space.Mmio, Platform.PciEcamBase + at, page - at, PciHostBridge.EcamWindow + at);
            at = page + EcamPageLength;
        }
        if (at < Platform.PciEcamLength)
            yield return new DeviceRange(DeviceProtocol.Space.Mmio, Platform.PciEcamBase + at, Platform.PciEcamLength - at, PciHostBridge.EcamWindow + at);
    }

    private const ulong EcamPageLength = 0x1000;

    /// <summary>A bus-0 function's configuration page in the ECAM window (PCIe Base 4.0 §7.2.2).</summary>
    private static ulong EcamPageOffset(PciRemoteFunction f) => (ulong)f.Device << 15 | (ulong)f.Function << 12;

    public const string VirtioRngName = "virtio-rng";

    /// <summary>The slot of the virtio entropy device: 00:01.0.</summary>
    public const int VirtioRngSlot = 1;

    /// <summary>
    /// The virtio entropy device (<see cref="Devices.Virtio.VirtioRng"/>, host entropy from
    /// <see cref="System.Security.Cryptography.RandomNumberGenerator"/>) as PCI function 00:01.0
    /// (<see cref="VirtioPciFunction"/>): one device actor for its configuration space (its ECAM page,
    /// and what the host bridge passes on) and its BAR, which the VM moves on the vcpus' buses where
    /// the guest places it.
    /// </summary>
    public static DeviceSpec VirtioRng() => VirtioPci(VirtioRngName, VirtioRngSlot,
        c => new Devices.Virtio.VirtioRng(c.Memory, System.Security.Cryptography.RandomNumberGenerator.Fill));

    public const string VirtioBlkName = "virtio-blk";

    /// <summary>The slot of the virtio block device: 00:02.0.</summary>
    public const int VirtioBlkSlot = 2;

    /// <summary>
    /// The virtio block device (<see cref="Devices.Virtio.VirtioBlk"/>) over <paramref name="disk"/> as PCI
    /// function 00:02.0. The VM owns the store (it outlives the device actor, so a restarted model goes on
    /// with the same open file); the function's record keeps the capacity the driver was told.
    /// GET_ID answers <paramref name="serial"/>.
    /// </summary>
    public static DeviceSpec VirtioBlk(IBlockBackend disk, string serial) => VirtioPci(VirtioBlkName, VirtioBlkSlot,
        (c, state, driverFeatures) => state?.Blk is { } saved
            ? Devices.Virtio.VirtioBlk.FromState(saved, c.Memory, disk, serial, driverFeatures)
            : new Devices.Virtio.VirtioBlk(c.Memory, disk, serial, driverFeatures));

    /// <summary>What GET_ID reports for the disk at <paramref name="path"/>: its file name, printable
    /// ASCII only, cut to the 20 bytes of VIRTIO_BLK_ID_BYTES (virtio 1.2 §5.2.6).</summary>
    public static string DiskSerial(string path)
    {
        var name = new string(Path.GetFileName(path).Where(ch => ch is >= ' ' and <= '~').ToArray());
        return name.Length <= VirtioBlkRequest.IdBytes ? name : name[..VirtioBlkRequest.IdBytes];
    }

    public const string VirtioConsoleName = "virtio-console";

    /// <summary>The slot of the virtio console: 00:03.0.</summary>
    public const int VirtioConsoleSlot = 3;

    /// <summary>
    /// The virtio console (<see cref="Devices.Virtio.VirtioConsole"/>, port 0) as PCI function 00:03.0: what
    /// the driver transmits goes to <paramref name="output"/> (the VM's console, the same one as COM1's);
    /// host input told to its actor (<see cref="DeviceProtocol.HostInput"/>) fills the receive buffers the
    /// driver posted (<see cref="VirtioPciFunction.OfferInput"/>). Input not yet delivered is in the
    /// function's record.
    /// </summary>
    public static DeviceSpec VirtioConsole(Action<ReadOnlySpan<byte>> output) => VirtioPci(VirtioConsoleName, VirtioConsoleSlot,
        (c, state, _) => state?.Console is { } saved
            ? Devices.Virtio.VirtioConsole.FromState(saved, c.Memory, output)
            : new Devices.Virtio.VirtioConsole(c.Memory, output));

    public const string VirtioNetName = "virtio-net";

    /// <summary>The slot of the virtio network card: 00:04.0.</summary>
    public const int VirtioNetSlot = 4;

    /// <summary>
    /// The virtio network card (<see cref="Devices.Virtio.VirtioNet"/>, address <paramref name="mac"/>) over
    /// <paramref name="backend"/> (a TAP interface) as PCI function 00:04.0. The VM owns the backend (it
    /// outlives the device actor: a restarted model goes on with the same open TAP) and watches it
    /// (<see cref="BackendWatcher"/>): frames that arrive reach the receive queue through
    /// <see cref="DeviceProtocol.BackendReady"/>, without the guest polling. The function's record keeps
    /// the card's counters.
    /// </summary>
    public static DeviceSpec VirtioNet(INetBackend backend, MacAddress mac) => VirtioPci(VirtioNetName, VirtioNetSlot,
        (c, state, driverFeatures) => state?.Net is { } saved
            ? Devices.Virtio.VirtioNet.FromState(saved, c.Memory, backend, driverFeatures)
            : new Devices.Virtio.VirtioNet(c.Memory, backend, mac, driverFeatures));

    /// <summary>
    /// A virtio device on the PCI bus at 00:<paramref name="slot"/>.0: its ECAM page routed to its
    /// actor, whose configuration writes the vcpus wait for (a BAR move must reach every vcpu's bus
    /// first); INTA# on its PCI interrupt wire (<see cref="PciInterruptRouting"/>); MSI-X messages to the
    /// local APICs (the APIC router: the vlapics, or KVM_SIGNAL_MSI under <c>lapic = assisted</c>).
    /// </summary>
    public static DeviceSpec VirtioPci(string name, int slot, Func<DeviceContext, IVirtioDevice> virtio) =>
        VirtioPci(name, slot, (c, _, _) => virtio(c));

    /// <summary><see cref="VirtioPci(string, int, Func{DeviceContext, IVirtioDevice})"/> for a device type
    /// rebuilt from the function's saved record (null: a new one) and told the features the driver
    /// negotiated (read when it needs them: they follow resets).</summary>
    public static DeviceSpec VirtioPci(string name, int slot, Func<DeviceContext, VirtioPciFunctionState?, Func<ulong>, IVirtioDevice> virtio)
    {
        VirtioPciFunction Build(DeviceContext c, VirtioPciFunctionState? state)
        {
            VirtioPciFunction? function = null;
            var device = virtio(c, state, () => function?.Transport.Common.DriverFeatures ?? 0);
            var ram = new GuestRam(c.Memory);
            var intx = PciIntx(c, slot);
            void SendMsi(MsiMessage m)
            {
                if (MsiDecoding.ToApicMessage(m) is { } message) c.ApicBus.Deliver(message);
            }
            void BarChanged(PciBarChange change) =>
                c.MapMmio(name, VirtioPciFunction.BarWindow, change.Size, change.NewAddress);
            return function = state is null
                ? new VirtioPciFunction(slot, device, ram, intx, SendMsi, BarChanged)
                : VirtioPciFunction.FromState(state, device, ram, intx, SendMsi, BarChanged);
        }
        return DeviceSpec.Wired(name, DeviceProtocol.Space.Mmio, Platform.PciEcamBase + ((ulong)slot << 15), EcamPageLength,
            c => Build(c, null), (c, state) => Build(c, (VirtioPciFunctionState)state)) with
        {
            Window = VirtioPciFunction.ConfigWindow,
            WaitForWriteAt = offset => offset < VirtioPciFunction.ConfigWindowLength,
            PciFunction = new PciRemoteFunction(slot, 0, name, VirtioPciFunction.ConfigWindow),
        };
    }

    /// <summary>INTA# of <paramref name="slot"/> on its wire: the wire's IOAPIC pin, pulled up while idle
    /// (active low, <see cref="PciInterruptRouting"/>). Each function drives a wire of its own
    /// (slots 1-4 reach four different wires with INTA#); a wire shared by functions in different actors
    /// would need the wired-OR in one place, which this platform does not have yet.</summary>
    private static IInterruptLine PciIntx(DeviceContext c, int slot)
    {
        var gsi = PciInterruptRouting.Gsi(slot, PciInterruptPin.IntA)!.Value;
        var routing = new PciInterruptRouting(g => g == gsi ? c.IoApicPin((int)g) : NullInterruptLine.Instance);
        return routing.Line(slot, PciInterruptPin.IntA);
    }

    /// <summary>The QEMU-convention debug-exit port. Its writes end the machine, so vcpus wait for them.</summary>
    public static DeviceSpec DebugExit() =>
        new("debug-exit", DeviceProtocol.Space.Port, Platform.DebugExitPort, Platform.DebugExitLength, events => new DebugExit(events))
        {
            WaitForWrites = true,
        };

    /// <summary>The i8042 keyboard controller, ports 0x60 (offset 0) and 0x64 (offset 4) only: 0x61
    /// belongs to the PIT (system control port B). Its command 0xFE resets the machine, so vcpus wait
    /// for its writes.</summary>
    public static DeviceSpec I8042() =>
        new("i8042", DeviceProtocol.Space.Port, Platform.I8042DataPort, 1, events => new I8042(events),
            (events, state) => ActorVmm.Devices.I8042.FromState((I8042State)state, events))
        {
            MoreRanges = [new DeviceRange(DeviceProtocol.Space.Port, Platform.I8042CommandPort, 1,
                Platform.I8042CommandPort - Platform.I8042DataPort)],
            WaitForWrites = true,
        };

    /// <summary>
    /// QEMU's pc-testdev (<see cref="PcTestDevice"/>), for standard x86 conformance suites: the scratch
    /// register at 0xE0 and 0xE8, the flush-page port 0xE4, the interrupt lines at 0x2000 (0-15: ISA
    /// IRQs to the IOAPIC and the 8259, as <see cref="DeviceContext.IsaIrq"/>; 16-23: IOAPIC pins only)
    /// and 64 KiB of MMIO RAM at 0xFF000000. Writes to the lines and the flush port are waited for
    /// and answered once the controllers or the vmspace have handled them; the others are posted.
    /// </summary>
    public static DeviceSpec TestDevice() =>
        DeviceSpec.Wired(TestDeviceName, DeviceProtocol.Space.Port, Platform.TestDevScratchPort, Platform.TestDevPortLength,
            c => new PcTestDevice(c.Events, TestDeviceLines(c)),
            (c, state) => PcTestDevice.FromState((PcTestDeviceState)state, c.Events, TestDeviceLines(c))) with
        {
            Window = PcTestDevice.ScratchWindow,
            MoreRanges =
            [
                new DeviceRange(DeviceProtocol.Space.Port, Platform.TestDevFlushPort, Platform.TestDevPortLength, PcTestDevice.FlushWindow),
                new DeviceRange(DeviceProtocol.Space.Port, Platform.TestDevByteScratchPort, Platform.TestDevPortLength,
                    PcTestDevice.ByteScratchWindow),
                new DeviceRange(DeviceProtocol.Space.Port, Platform.TestDevIrqPort, Platform.TestDevIrqLines, PcTestDevice.IrqWindow),
                new DeviceRange(DeviceProtocol.Space.Mmio, Platform.TestDevIomemBase, Platform.TestDevIomemLength, PcTestDevice.IomemWindow),
            ],
            WaitForWriteAt = PcTestDevice.ActsBeyondTheDevice,
        };

    public const string TestDeviceName = "pc-testdev";

    /// <summary>Lines 0-15: ISA IRQs; 16-23: IOAPIC pins 16-23.</summary>
    private static IInterruptLine[] TestDeviceLines(DeviceContext c) =>
    [
        .. Enumerable.Range(0, 16).Select(c.SyncedIsaIrq),
        .. Enumerable.Range(16, PcTestDevice.Lines - 16).Select(c.SyncedIoApicPin),
    ];

    /// <summary>COM1 with its interrupt on ISA IRQ 4. It can run on another host node than its VM
    /// (<see cref="DeviceSpec.Hostable"/>): its output then comes back to <paramref name="output"/>.</summary>
    public static DeviceSpec Com1(Action<byte> output) =>
        DeviceSpec.Wired("uart0", DeviceProtocol.Space.Port, Platform.Com1Port, Platform.Com1Length,
            c => Com1Model(c, output, null), (c, state) => Com1Model(c, output, state)) with
        {
            Hostable = new HostableDevice(Com1Kind, output),
        };

    /// <summary>The kind of model COM1 is, for a node that hosts it for a VM elsewhere.</summary>
    public const string Com1Kind = "com1";

    private static IBusDevice Com1Model(DeviceContext c, Action<byte> output, object? state) => state is null
        ? new Uart16550(c.IsaIrq((int)Platform.Com1Gsi), output)
        : Uart16550.FromState((UartState)state, c.IsaIrq((int)Platform.Com1Gsi), output);

    /// <summary>The kinds of device a host node can run for a VM on another node, with the type of
    /// their state records.</summary>
    private static readonly Dictionary<string, Type> Hostable = new(StringComparer.Ordinal) { [Com1Kind] = typeof(UartState) };

    public static IReadOnlyCollection<string> HostableKinds => Hostable.Keys;

    public static bool IsHostable(string kind) => Hostable.ContainsKey(kind);

    /// <summary>Whether <paramref name="state"/> is a state record a model of <paramref name="kind"/> is built from.</summary>
    public static bool FitsHostable(string kind, object state) => Hostable.TryGetValue(kind, out var type) && type.IsInstanceOfType(state);

    /// <summary>
    /// The model of a device of <paramref name="kind"/> (<see cref="HostableKinds"/>) for a VM on another
    /// node, wired through <paramref name="context"/> (its interrupt lines to that VM's controllers), its
    /// output to <paramref name="output"/>; from <paramref name="state"/> (null: power-on).
    /// </summary>
    public static IBusDevice HostableModel(string kind, DeviceContext context, Action<byte> output, object? state) => kind switch
    {
        Com1Kind => Com1Model(context, output, state),
        _ => throw new ArgumentException($"no device of kind \"{kind}\" can be hosted", nameof(kind)),
    };
}

using ActorVmm.Devices.Pci;

namespace ActorVmm.Devices.Virtio;

/// <summary>
/// The state record of a <see cref="VirtioPciFunction"/> (restarts, snapshots): its slot and device
/// type, its configuration space as the guest left it (256 bytes) with its INTx level, its MSI-X table
/// (4 dwords a vector) and pending bits, the virtio transport's state, and the device type's own record
/// where it has one (<see cref="Blk"/> for virtio-blk, <see cref="Console"/> for virtio-console, <see cref="Net"/>
/// for virtio-net; null for a device without state beyond its queues, and in records saved before these
/// existed). Equality compares contents.
/// </summary>
public sealed record VirtioPciFunctionState(
    int Device,
    ushort VirtioDeviceId,
    byte[] Config,
    bool IntxLevel,
    uint[] MsixEntries,
    ulong[] MsixPending,
    VirtioPciTransportState Transport,
    VirtioBlkState? Blk = null,
    VirtioConsoleState? Console = null,
    VirtioNetState? Net = null)
{
    public bool Equals(VirtioPciFunctionState? other) =>
        other is not null && Device == other.Device && VirtioDeviceId == other.VirtioDeviceId && IntxLevel == other.IntxLevel
        && Config.AsSpan().SequenceEqual(other.Config) && MsixEntries.AsSpan().SequenceEqual(other.MsixEntries)
        && MsixPending.AsSpan().SequenceEqual(other.MsixPending) && Transport == other.Transport
        && Blk == other.Blk && Console == other.Console && Net == other.Net;

    public override int GetHashCode() => HashCode.Combine(Device, VirtioDeviceId, Config.Length, MsixEntries.Length, Transport);
}

/// <summary>
/// A virtio device on the PCI bus (virtio 1.2 §4.1, "modern", non-transitional), as ONE bus device: its
/// configuration space and its memory BAR, seen by its actor at two offset windows:
/// <list type="bullet">
/// <item><see cref="ConfigWindow"/>: configuration space, register = offset (the function's 4 KiB ECAM
/// page maps here directly; the host bridge passes mechanism #1 accesses here too). Accesses of 1, 2 or
/// 4 bytes; others read all ones and write nothing (PCIe Base 4.0 §7.2.2.1).</item>
/// <item><see cref="BarWindow"/>: BAR 0 (64-bit memory, <see cref="BarSize"/> bytes, not prefetchable),
/// at the address the guest placed it: common configuration at 0x0000 (§4.1.4.3), ISR status at
/// 0x1000 (§4.1.4.5), device-specific configuration at 0x2000 (§4.1.4.6), notifications at 0x3000
/// (§4.1.4.4: queue q at q × <see cref="VirtioPciTransport.NotifyOffMultiplier"/>), the MSI-X table at
/// 0x4000 and its PBA at 0x5000 (PCI Local Bus 3.0 §6.8.2); the rest reads 0. While memory decoding is
/// off (Command bit 1) the BAR answers nothing: reads all ones, writes dropped.</item>
/// </list>
/// Identity (§4.1.2): vendor 0x1AF4, device 0x1040 + the virtio device ID, revision 1, subsystem vendor
/// 0x1AF4 and subsystem ID = the device ID (≥ 0x40, §4.1.2.1); the class code by device type
/// (<see cref="ClassOf"/>). Interrupt pin INTA#, routed by <see cref="PciInterruptRouting"/>.
/// Capabilities: MSI-X (one vector per queue plus one for configuration changes) and the virtio vendor
/// capabilities (ID 09h, §4.1.4: <c>cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], le32
/// offset, le32 length</c>, the notify one followed by <c>le32 notify_off_multiplier</c>) for the common,
/// notify, ISR and (for a device that has one) device-specific structures. The optional
/// VIRTIO_PCI_CAP_PCI_CFG access window (§4.1.4.9) is not offered.
///
/// Behaviour: BAR moves (and memory decode on/off) are reported to <c>barChanged</c> synchronously from
/// the configuration write (<see cref="PciBus"/>'s listener), so the VM re-routes the range before the
/// guest's next access. Interrupts: with MSI-X enabled, the transport's vectors go through the MSI-X
/// table (masked → pending, PCI Local Bus 3.0 §6.8.2.10) to <c>sendMsi</c>; otherwise INTx# follows the
/// ISR (asserted until the driver reads it). While bus mastering is off (Command bit 2, §6.2.2) the
/// function makes no memory access: queue notifications are ignored and no message is sent. Host input
/// (<see cref="OfferInput"/>) goes to a device type that takes it (the console). The record
/// (<see cref="VirtioPciFunctionState"/>) carries the device type's own state where it has one.
/// </summary>
public sealed class VirtioPciFunction : IStatefulDevice, IHostInput, IBackendInput
{
    public const ulong ConfigWindow = 0;
    public const ulong ConfigWindowLength = 0x1000;
    public const ulong BarWindow = 0x1_0000_0000;
    public const int BarIndex = 0;
    public const ulong BarSize = 0x8000;

    public const uint CommonOffset = 0x0000;
    public const uint IsrOffset = 0x1000;
    public const uint DeviceConfigOffset = 0x2000;
    public const uint NotifyOffset = 0x3000;
    public const uint MsixTableOffset = 0x4000;
    public const uint MsixPbaOffset = 0x5000;
    private const ulong RegionLength = 0x1000;

    public const ushort VendorId = 0x1AF4;
    public const ushort DeviceIdBase = 0x1040;
    public const byte Revision = 1;

    /// <summary>The vendor-specific capability ID (PCI Local Bus 3.0 Appendix H) virtio uses.</summary>
    public const byte VendorCapabilityId = 0x09;
    public const byte CapCommonCfg = 1;
    public const byte CapNotifyCfg = 2;
    public const byte CapIsrCfg = 3;
    public const byte CapDeviceCfg = 4;
    private const int VirtioCapLength = 16;
    private const int NotifyCapLength = 20;

    private readonly int _device;
    private readonly IVirtioDevice _virtio;
    private readonly PciBus _bus;
    private readonly PciConfigSpace _config;
    private readonly MsiXCapability _msix;
    private VirtioPciTransport _transport;

    /// <param name="device">the slot on bus 0 (1-31; function 0)</param>
    /// <param name="virtio">the device type behind the transport</param>
    /// <param name="ram">guest RAM its queues must lie in</param>
    /// <param name="intx">INTA# of the slot (Assert: asserted), as <see cref="PciInterruptRouting.Line"/> gives it</param>
    /// <param name="sendMsi">sends a message-signalled interrupt (to the local APICs)</param>
    /// <param name="barChanged">told of every change of where the BAR decodes, from inside the write that made it</param>
    public VirtioPciFunction(int device, IVirtioDevice virtio, GuestRam ram, IInterruptLine intx, Action<MsiMessage> sendMsi,
        Action<PciBarChange> barChanged)
        : this(device, virtio, ram, intx, sendMsi, barChanged, null)
    {
    }

    private VirtioPciFunction(int device, IVirtioDevice virtio, GuestRam ram, IInterruptLine intx, Action<MsiMessage> sendMsi,
        Action<PciBarChange> barChanged, VirtioPciFunctionState? state)
    {
        if (device is < 1 or >= PciBus.Devices) throw new ArgumentOutOfRangeException(nameof(device), "a virtio function sits in slot 1-31");
        _device = device;
        _virtio = virtio;
        var deviceId = (ushort)(DeviceIdBase + virtio.DeviceId);
        var (baseClass, subClass) = ClassOf(virtio.DeviceId);
        _config = new PciConfigSpace(new PciIds(VendorId, deviceId, baseClass, subClass, Revision: Revision,
            SubsystemVendorId: VendorId, SubsystemId: deviceId), PciInterruptPin.IntA);
        _bus = new PciBus { Listener = new BarListener(barChanged) };
        _bus.Attach(device, 0, _config);
        _config.AddMemoryBar64(BarIndex, BarSize);

        _transport = new VirtioPciTransport(ram, virtio, new LevelInput(_config.SetIntx), SignalMsix);
        _msix = new MsiXCapability(_config, _transport.MsixVectors, BarIndex, MsixTableOffset, BarIndex, MsixPbaOffset, sendMsi);
        AddVirtioCapability(CapCommonCfg, CommonOffset, VirtioPciCommonConfig.Length);
        var notify = AddVirtioCapability(CapNotifyCfg, NotifyOffset,
            (uint)(virtio.QueueMaxSizes.Count * VirtioPciTransport.NotifyOffMultiplier), NotifyCapLength);
        _config.Set(notify + 16, 4, VirtioPciTransport.NotifyOffMultiplier);
        AddVirtioCapability(CapIsrCfg, IsrOffset, 1);
        if (virtio.ConfigLength > 0) AddVirtioCapability(CapDeviceCfg, DeviceConfigOffset, (uint)virtio.ConfigLength);
        _config.Written += (_, _) => _transport.MsixEnabled = _msix.Enabled;

        if (state is not null)
        {
            _config.Restore(new PciConfigSpaceSnapshot(state.Config, state.IntxLevel));
            _msix.Table.Restore(new MsiXTableSnapshot(state.MsixEntries, state.MsixPending));
            _transport = VirtioPciTransport.FromState(ram, virtio, new LevelInput(_config.SetIntx), SignalMsix, state.Transport);
            _transport.MsixEnabled = _msix.Enabled;
        }
        _config.ConnectIntx(intx);
        _bus.ResyncAll(); // a restored BAR decodes again where it did
    }

    /// <summary>The function continuing from <paramref name="state"/> (same slot and device type); its
    /// BAR is reported where it decodes, its INTx# driven as saved, its queues resume from their used rings.</summary>
    public static VirtioPciFunction FromState(VirtioPciFunctionState state, IVirtioDevice virtio, GuestRam ram, IInterruptLine intx,
        Action<MsiMessage> sendMsi, Action<PciBarChange> barChanged)
    {
        if (StateProblem(state) is { } problem) throw new ArgumentException(problem, nameof(state));
        if (state.VirtioDeviceId != virtio.DeviceId)
            throw new ArgumentException($"the saved function is virtio device {state.VirtioDeviceId}, not {virtio.DeviceId}", nameof(state));
        if (state.Transport.Common.Queues.Length != virtio.QueueMaxSizes.Count)
            throw new ArgumentException($"the saved function has {state.Transport.Common.Queues.Length} queues, not {virtio.QueueMaxSizes.Count}", nameof(state));
        return new VirtioPciFunction(state.Device, virtio, ram, intx, sendMsi, barChanged, state);
    }

    /// <summary>Why <paramref name="state"/> cannot be restored, or null.</summary>
    public static string? StateProblem(VirtioPciFunctionState state)
    {
        if (state.Device is < 1 or >= PciBus.Devices) return $"slot {state.Device} is not 1-31";
        if (state.Config.Length != PciConfigSpace.ConventionalSize)
            return $"the configuration space must have {PciConfigSpace.ConventionalSize} bytes, not {state.Config.Length}";
        var vectors = state.Transport.Common.Queues.Length + 1;
        if (state.MsixEntries.Length != vectors * 4)
            return $"the MSI-X table must have {vectors * 4} dwords (a queue's vector each and the configuration's), not {state.MsixEntries.Length}";
        if (state.MsixPending.Length != (vectors + 63) / 64)
            return $"the MSI-X pending bits must be {(vectors + 63) / 64} qwords, not {state.MsixPending.Length}";
        if (state.Blk is not null && state.VirtioDeviceId != VirtioBlk.VirtioDeviceId)
            return $"virtio device {state.VirtioDeviceId} has no virtio-blk state";
        if (state.Console is not null && state.VirtioDeviceId != VirtioConsole.VirtioDeviceId)
            return $"virtio device {state.VirtioDeviceId} has no virtio-console state";
        if (state.Console is not null && VirtioConsole.StateProblem(state.Console) is { } console) return console;
        if (state.Net is not null && state.VirtioDeviceId != VirtioNet.VirtioDeviceId)
            return $"virtio device {state.VirtioDeviceId} has no virtio-net state";
        if (state.Net is not null && VirtioNet.StateProblem(state.Net) is { } net) return net;
        return null;
    }

    public object SaveState()
    {
        var config = _config.State();
        var table = _msix.Table.State();
        return new VirtioPciFunctionState(_device, _virtio.DeviceId, config.Bytes, config.IntxLevel, table.Entries, table.Pending,
            _transport.State())
        {
            Blk = (_virtio as VirtioBlk)?.State(),
            Console = (_virtio as VirtioConsole)?.State(),
            Net = (_virtio as VirtioNet)?.State(),
        };
    }

    /// <summary>
    /// Host input for a device type that takes it (<see cref="VirtioConsole"/>; any other takes none):
    /// the device holds what it accepts, then its receive queue is processed as if the driver had
    /// notified it, so buffers the driver posted are filled and the used-buffer notification sent. While
    /// bus mastering is off nothing is written: the input waits for the driver's next notification.
    /// </summary>
    public int OfferInput(ReadOnlySpan<byte> data)
    {
        if (_virtio is not VirtioConsole console) return 0;
        var taken = console.Input(data);
        if (console.HasPendingInput && _config.BusMasterEnabled) _transport.NotifyQueue(VirtioConsole.ReceiveQueue);
        return taken;
    }

    /// <summary>The device type's host backend has input (<see cref="IVirtioBackendInput"/>): taken into the
    /// driver's buffers, with the used-buffer notification, while bus mastering is on and the device
    /// live; dropped otherwise (<see cref="VirtioPciTransport.BackendReady"/>).</summary>
    public void BackendReady() => _transport.BackendReady(_config.BusMasterEnabled);

    /// <summary>The PCI base class and sub-class of a virtio device type (what QEMU's virtio-pci
    /// devices report, so a guest's class-based probing sees the same): network 02/00, block 01/00,
    /// console 07/80; others (entropy source included) FF/00, "device does not fit any class".</summary>
    public static (byte BaseClass, byte SubClass) ClassOf(ushort virtioDeviceId) => virtioDeviceId switch
    {
        1 => (0x02, 0x00),
        2 => (0x01, 0x00),
        3 => (0x07, 0x80),
        _ => (0xFF, 0x00),
    };

    public int Device => _device;

    public PciConfigSpace Config => _config;

    public MsiXCapability MsiX => _msix;

    public VirtioPciTransport Transport => _transport;

    public ulong Read(ulong offset, int size)
    {
        if (offset < ConfigWindowLength)
            return size is 1 or 2 or 4 ? _bus.Read(_device, 0, (int)offset, size) : AccessSize.AllOnes(size);
        if (offset - BarWindow >= BarSize || !AccessSize.IsValid(size) || _config.DecodedAddress(BarIndex) is null)
            return AccessSize.AllOnes(size);
        var at = offset - BarWindow;
        if (_msix.TryReadBar(BarIndex, at, size, out var value)) return value;
        return Region(at, out var within) is { } region ? region.Read(within, size) : 0;
    }

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset < ConfigWindowLength)
        {
            if (size is 1 or 2 or 4) _bus.Write(_device, 0, (int)offset, size, (uint)value);
            return;
        }
        if (offset - BarWindow >= BarSize || !AccessSize.IsValid(size) || _config.DecodedAddress(BarIndex) is null) return;
        var at = offset - BarWindow;
        if (_msix.TryWriteBar(BarIndex, at, size, value)) return;
        if (Region(at, out var within) is not { } region) return;
        if (ReferenceEquals(region, _transport.Notify) && !_config.BusMasterEnabled) return; // no DMA without bus mastering
        region.Write(within, size, value);
    }

    private IBusDevice? Region(ulong at, out ulong within)
    {
        within = at % RegionLength;
        return (at / RegionLength * RegionLength) switch
        {
            CommonOffset => _transport.Common,
            IsrOffset => _transport.Isr,
            DeviceConfigOffset => _transport.DeviceConfig,
            NotifyOffset => _transport.Notify,
            _ => null,
        };
    }

    private void SignalMsix(ushort vector) => _msix.Signal(vector);

    /// <summary>A virtio vendor capability (§4.1.4) pointing into BAR 0; returns its offset.</summary>
    private int AddVirtioCapability(byte type, uint offset, uint length, int capLength = VirtioCapLength)
    {
        var at = _config.AddCapability(VendorCapabilityId, capLength);
        _config.Set(at + 2, 1, (uint)capLength);
        _config.Set(at + 3, 1, type);
        _config.Set(at + 4, 1, BarIndex);
        _config.Set(at + 8, 4, offset);
        _config.Set(at + 12, 4, length);
        return at;
    }

    private sealed class BarListener(Action<PciBarChange> changed) : IPciBarListener
    {
        public void BarChanged(PciBarChange change) => changed(change);
    }
}

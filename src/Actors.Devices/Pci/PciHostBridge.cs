namespace ActorVmm.Devices.Pci;

/// <summary>The host bridge's state for a restart: the latched CONFIG_ADDRESS and function 00:00.0's
/// configuration space. Like <see cref="PciConfigSpaceSnapshot"/> and <see cref="MsiXTableSnapshot"/>, a part
/// for the state record of the device actor that owns the model, not itself a record <see cref="DeviceStateCodec"/> knows.</summary>
public sealed record PciHostBridgeSnapshot(uint ConfigAddress, PciConfigSpaceSnapshot HostBridge);

/// <summary>A function on bus 0 that is a device actor of its own (<paramref name="Actor"/>, the
/// device's name among the VM's devices), whose configuration space that actor serves at offsets
/// <paramref name="ConfigWindow"/> + register.</summary>
public sealed record PciRemoteFunction(int Device, int Function, string Actor, ulong ConfigWindow);

/// <summary>The host bridge's state record (restarts, snapshots): the latched CONFIG_ADDRESS and the
/// configuration space of function 00:00.0 (<see cref="PciHostBridge.StateProblem"/> checks its size).</summary>
public sealed record PciHostBridgeState(uint ConfigAddress, byte[] HostBridgeConfig);

/// <summary>
/// The PCI host bridge as ONE bus device with three windows onto one <see cref="PciBus"/>, so the
/// two configuration mechanisms reach the same functions through a single owner (one actor, no
/// ordering question between a CF8/CFC access and an ECAM access to the same register), as
/// <see cref="PicDevice"/> serves its three port ranges:
/// <list type="bullet">
/// <item><see cref="EcamWindow"/>, at <see cref="Platform.PciEcamBase"/> (MMIO, <see cref="Platform.PciEcamLength"/>):
/// the enhanced configuration access mechanism (PCIe Base 4.0 §7.2.2): offset = bus &lt;&lt; 20 |
/// device &lt;&lt; 15 | function &lt;&lt; 12 | register; bus 0 only. Accesses of 1, 2 or 4 bytes; an 8-byte
/// access (not a configuration request, §7.2.2.1) reads all ones and writes nothing.</item>
/// <item><see cref="ConfigAddressWindow"/>, at <see cref="Platform.PciConfigAddressPort"/> (port 0xCF8,
/// a range of 1 byte so 0xCF9 stays the reset register): CONFIG_ADDRESS of configuration mechanism #1
/// (PCI Local Bus 3.0 §3.2.2.3.2): bit 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2
/// register; 30:24 and 1:0 read 0. Only a dword access at 0xCF8 reaches it; a byte or word access
/// there is ordinary I/O to nothing (reads all ones, writes dropped), as the spec says.</item>
/// <item><see cref="ConfigDataWindow"/>, at <see cref="Platform.PciConfigDataPort"/> (ports 0xCFC-0xCFF):
/// CONFIG_DATA. An access of n bytes at 0xCFC + k reaches register (CONFIG_ADDRESS[7:2] &lt;&lt; 2) + k,
/// bytes k..k+n-1 of the addressed dword (the byte lanes); bytes past 0xCFF read 0xFF and are not
/// written. With the enable bit clear, or a bus other than 0, reads return all ones and writes are dropped.</item>
/// </list>
/// Function 00:00.0 is the host bridge itself (class 06/00/00, §D: host bridge), with the IDs of
/// QEMU's generic PCIe host bridge (1B36:0008, a Red Hat ID made for a VMM's host bridge, which
/// Linux binds no quirk to).
/// </summary>
public sealed class PciHostBridge : IStatefulDevice, IForwardingDevice
{
    public const ulong EcamWindow = 0x0000_0000;
    public const ulong ConfigAddressWindow = 0x1000_0000;
    public const ulong ConfigDataWindow = 0x1000_0004;
    public const ulong ConfigDataLength = 4;

    public const uint ConfigAddressEnable = 0x8000_0000;
    private const uint ConfigAddressWritable = 0x80FF_FFFC;

    public static readonly PciIds HostBridgeIds = new(VendorId: 0x1B36, DeviceId: 0x0008, BaseClass: 0x06, SubClass: 0x00);

    /// <param name="bus">bus 0 with the functions this bridge's actor serves itself (00:00.0 is added)</param>
    /// <param name="remote">functions that are device actors of their own: their configuration
    /// accesses through either mechanism go to that actor (<see cref="TryForward"/>)</param>
    public PciHostBridge(PciBus? bus = null, IReadOnlyList<PciRemoteFunction>? remote = null)
    {
        Bus = bus ?? new PciBus();
        HostBridge = Bus.Function(0, 0) ?? Bus.Attach(0, 0, new PciConfigSpace(HostBridgeIds, extended: true));
        Remote = remote ?? [];
        foreach (var f in Remote)
        {
            if (f.Device is < 0 or >= PciBus.Devices || f.Function is < 0 or >= PciBus.FunctionsPerDevice || Bus.Function(f.Device, f.Function) is not null)
                throw new ArgumentException($"00:{f.Device:x2}.{f.Function} cannot be a remote function", nameof(remote));
            if (Remote.Count(o => o.Device == f.Device && o.Function == f.Function) > 1)
                throw new ArgumentException($"00:{f.Device:x2}.{f.Function} is given twice", nameof(remote));
        }
    }

    /// <summary>The functions served by device actors of their own.</summary>
    public IReadOnlyList<PciRemoteFunction> Remote { get; }

    /// <summary>
    /// A configuration access of a remote function goes to its actor, at its <see cref="PciRemoteFunction.ConfigWindow"/>
    /// + register: through CONFIG_DATA while CONFIG_ADDRESS (enabled, bus 0) names it, an access of
    /// 1, 2 or 4 bytes that stays inside the addressed dword's lanes, or through its ECAM page (which
    /// the VM normally routes to the function's actor directly). Everything else is the bridge's.
    /// </summary>
    public bool TryForward(ulong offset, int size, out string device, out ulong deviceOffset)
    {
        device = "";
        deviceOffset = 0;
        if (Remote.Count == 0 || size is not (1 or 2 or 4)) return false;
        int d, f, register;
        if (offset < Platform.PciEcamLength)
        {
            if (!Ecam(offset, out d, out f, out register)) return false;
        }
        else if (offset - ConfigDataWindow < ConfigDataLength && Mechanism1(out d, out f, out register))
        {
            var lane = (int)(offset - ConfigDataWindow);
            if (lane + size > 4) return false;
            register += lane;
        }
        else return false;
        foreach (var r in Remote)
        {
            if (r.Device != d || r.Function != f) continue;
            device = r.Actor;
            deviceOffset = r.ConfigWindow + (ulong)register;
            return true;
        }
        return false;
    }

    public PciBus Bus { get; }

    /// <summary>Function 00:00.0.</summary>
    public PciConfigSpace HostBridge { get; }

    /// <summary>The latched CONFIG_ADDRESS (0 at reset).</summary>
    public uint ConfigAddress { get; private set; }

    public static PciHostBridge FromState(PciHostBridgeSnapshot state, PciBus bus, IReadOnlyList<PciRemoteFunction>? remote = null)
    {
        var bridge = new PciHostBridge(bus, remote) { ConfigAddress = state.ConfigAddress & ConfigAddressWritable };
        bridge.HostBridge.Restore(state.HostBridge);
        return bridge;
    }

    public PciHostBridgeSnapshot State() => new(ConfigAddress, HostBridge.State());

    /// <summary>Function 00:00.0's configuration space is ECAM-sized.</summary>
    public const int HostBridgeConfigBytes = 4096;

    object IStatefulDevice.SaveState() => new PciHostBridgeState(ConfigAddress, HostBridge.State().Bytes);

    /// <summary>A bridge (on a bus of its own) from its state record.</summary>
    public static PciHostBridge FromState(PciHostBridgeState state, IReadOnlyList<PciRemoteFunction>? remote = null) =>
        FromState(new PciHostBridgeSnapshot(state.ConfigAddress, new PciConfigSpaceSnapshot(state.HostBridgeConfig, IntxLevel: false)),
            new PciBus(), remote);

    /// <summary>Why <paramref name="state"/> cannot be restored, or null.</summary>
    public static string? StateProblem(PciHostBridgeState state) =>
        state.HostBridgeConfig.Length == HostBridgeConfigBytes
            ? null
            : $"the host bridge's configuration space must have {HostBridgeConfigBytes} bytes, not {state.HostBridgeConfig.Length}";

    public ulong Read(ulong offset, int size)
    {
        if (offset < Platform.PciEcamLength)
            return size is 1 or 2 or 4 && Ecam(offset, out var d, out var f, out var reg)
                ? Bus.Read(d, f, reg, size)
                : AccessSize.AllOnes(size);
        if (offset == ConfigAddressWindow)
            return size == 4 ? ConfigAddress : AccessSize.AllOnes(size);
        if (offset - ConfigDataWindow < ConfigDataLength && AccessSize.IsValid(size) && Mechanism1(out var dev, out var fn, out var register))
        {
            var lane = (int)(offset - ConfigDataWindow);
            var inside = Math.Min(size, 4 - lane);
            var value = (ulong)Bus.Read(dev, fn, register + lane, inside);
            return value | (AccessSize.AllOnes(size) & ~AccessSize.AllOnes(inside));
        }
        return AccessSize.AllOnes(size);
    }

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset < Platform.PciEcamLength)
        {
            if (size is 1 or 2 or 4 && Ecam(offset, out var d, out var f, out var reg))
                Bus.Write(d, f, reg, size, (uint)value);
            return;
        }
        if (offset == ConfigAddressWindow)
        {
            if (size == 4) ConfigAddress = (uint)value & ConfigAddressWritable;
            return;
        }
        if (offset - ConfigDataWindow < ConfigDataLength && AccessSize.IsValid(size) && Mechanism1(out var dev, out var fn, out var register))
        {
            var lane = (int)(offset - ConfigDataWindow);
            Bus.Write(dev, fn, register + lane, Math.Min(size, 4 - lane), (uint)value);
        }
    }

    private static bool Ecam(ulong offset, out int device, out int function, out int register)
    {
        device = (int)(offset >> 15) & 0x1F;
        function = (int)(offset >> 12) & 0x7;
        register = (int)(offset & 0xFFF);
        return offset >> 20 == 0; // bus 0
    }

    private bool Mechanism1(out int device, out int function, out int register)
    {
        var a = ConfigAddress;
        device = (int)(a >> 11) & 0x1F;
        function = (int)(a >> 8) & 0x7;
        register = (int)(a & 0xFC);
        return (a & ConfigAddressEnable) != 0 && ((a >> 16) & 0xFF) == 0;
    }
}

using System.Collections.Immutable;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>The per-queue registers of the common configuration (§4.1.4.3), and the ring's own state
/// while the queue is enabled.</summary>
public sealed record VirtioQueueRegisters(
    ushort MaxSize,
    ushort Size,
    ushort MsixVector,
    ulong Desc,
    ulong Driver,
    ulong Device,
    VirtqueueState? Ring)
{
    public bool Enabled => Ring is not null;

    public static VirtioQueueRegisters AtReset(ushort maxSize) =>
        new(maxSize, maxSize, VirtioPciCommonConfig.NoVector, 0, 0, 0, null);
}

/// <summary>Snapshot of a <see cref="VirtioPciCommonConfig"/>.</summary>
public sealed record VirtioPciCommonState(
    byte Status,
    uint DeviceFeatureSelect,
    uint DriverFeatureSelect,
    ulong DriverFeatures,
    ushort ConfigMsixVector,
    byte ConfigGeneration,
    ushort QueueSelect,
    ImmutableArray<VirtioQueueRegisters> Queues)
{
    public bool Equals(VirtioPciCommonState? other) =>
        other is not null && Status == other.Status && DeviceFeatureSelect == other.DeviceFeatureSelect
        && DriverFeatureSelect == other.DriverFeatureSelect && DriverFeatures == other.DriverFeatures
        && ConfigMsixVector == other.ConfigMsixVector && ConfigGeneration == other.ConfigGeneration
        && QueueSelect == other.QueueSelect && Queues.AsSpan().SequenceEqual(other.Queues.AsSpan());

    public override int GetHashCode() => HashCode.Combine(Status, DriverFeatures, QueueSelect, Queues.Length);
}

/// <summary>
/// The modern virtio-pci common configuration structure (virtio 1.2 §4.1.4.3) as a register model,
/// with the device status state machine (§2.1, §3.1.1) and the virtqueues it configures.
///
/// Register map (offset, width, access for the driver):
/// <code>
/// 0x00 le32 device_feature_select  RW   0x16 le16 queue_select       RW
/// 0x04 le32 device_feature         RO   0x18 le16 queue_size         RW
/// 0x08 le32 driver_feature_select  RW   0x1A le16 queue_msix_vector  RW
/// 0x0C le32 driver_feature         RW   0x1C le16 queue_enable       RW
/// 0x10 le16 config_msix_vector     RW   0x1E le16 queue_notify_off   RO
/// 0x12 le16 num_queues             RO   0x20 le64 queue_desc         RW
/// 0x14 u8   device_status          RW   0x28 le64 queue_driver       RW
/// 0x15 u8   config_generation      RO   0x30 le64 queue_device       RW
///                                       0x38 le16 queue_notify_data  RO (0: no NOTIF_CONFIG_DATA)
///                                       0x3A le16 queue_reset        RO (0: no RING_RESET)
/// </code>
/// Choices where the spec leaves the device free ("undefined" driver behaviour), each harmless to a
/// driver that follows §4.1.3.1 (fields are accessed at their natural width; a 64-bit field may be
/// accessed as two 32-bit halves):
/// <list type="bullet">
/// <item>An access of any other width or offset reads 0 and is ignored when written.</item>
/// <item>Writes to read-only fields, to the queue fields of an enabled queue (§4.1.4.3.2: the driver
/// configures a queue before enabling it), to driver_feature after FEATURES_OK, and of 0 to
/// queue_enable (§4.1.4.3.2: "The driver MUST NOT write a 0 to queue_enable") are ignored.</item>
/// <item>device_status: the driver can only add bits (§2.1.1: it "MUST NOT clear a device status bit");
/// a bit is taken only in the §3.1.1 order (DRIVER after ACKNOWLEDGE, FEATURES_OK after DRIVER,
/// DRIVER_OK after FEATURES_OK), FEATURES_OK only if the driver's features are a subset of the
/// offered ones and include VIRTIO_F_VERSION_1 (§2.2.2, §6.2), else it stays clear for the driver to
/// see (§3.1.1 step 6). DEVICE_NEEDS_RESET is the device's to set. Writing 0 resets the device (§2.4).</item>
/// <item>A queue is created from its registers when queue_enable is written 1; a bad layout (size not
/// a power of two, rings outside RAM) breaks it at once, which sets DEVICE_NEEDS_RESET.</item>
/// <item>An MSI-X vector beyond the table reads back as NO_VECTOR (§4.1.5.1.2: the device reports a
/// mapping it could not make that way).</item>
/// </list>
/// Queue notify offsets: queue_notify_off = the queue's index (the notify region places queue q at
/// q × notify_off_multiplier).
/// </summary>
public sealed class VirtioPciCommonConfig : IBusDevice
{
    public const ushort NoVector = 0xFFFF;
    public const int Length = 0x3C;

    // Register offsets (§4.1.4.3).
    private const int DeviceFeatureSelect = 0x00;
    private const int DeviceFeature = 0x04;
    private const int DriverFeatureSelect = 0x08;
    private const int DriverFeature = 0x0C;
    private const int ConfigMsixVectorReg = 0x10;
    private const int NumQueues = 0x12;
    private const int DeviceStatus = 0x14;
    private const int ConfigGenerationReg = 0x15;
    private const int QueueSelectReg = 0x16;
    private const int QueueSize = 0x18;
    private const int QueueMsixVector = 0x1A;
    private const int QueueEnable = 0x1C;
    private const int QueueNotifyOff = 0x1E;
    private const int QueueDesc = 0x20;
    private const int QueueDriver = 0x28;
    private const int QueueDevice = 0x30;
    private const int QueueNotifyData = 0x38;
    private const int QueueReset = 0x3A;

    private readonly GuestRam _ram;
    private readonly ushort _msixVectors;
    private readonly Action _onReset;
    private readonly Action _onDriverOk;
    private readonly VirtioQueueRegisters[] _queues;
    private readonly SplitVirtqueue?[] _rings;
    private uint _deviceFeatureSelect;
    private uint _driverFeatureSelect;
    private ulong _driverFeatures;
    private ushort _configVector = NoVector;
    private ushort _queueSelect;

    /// <summary>The features the device offers (VIRTIO_F_VERSION_1 always among them).</summary>
    public ulong DeviceFeatures { get; }
    public byte Status { get; private set; }
    public byte ConfigGeneration { get; private set; }
    /// <summary>The features the driver accepted (valid once FEATURES_OK is set).</summary>
    public ulong DriverFeatures => _driverFeatures;
    public ushort ConfigMsixVector => _configVector;
    public int QueueCount => _queues.Length;

    /// <summary>Whether the device may consume buffers and notify: DRIVER_OK set (§2.1.2: not before)
    /// and no DEVICE_NEEDS_RESET or FAILED.</summary>
    public bool IsLive => (Status & VirtioStatus.DriverOk) != 0
        && (Status & (VirtioStatus.DeviceNeedsReset | VirtioStatus.Failed)) == 0;

    /// <param name="ram">Guest RAM the rings must lie in.</param>
    /// <param name="deviceFeatures">Offered features; VIRTIO_F_VERSION_1 is added.</param>
    /// <param name="queueMaxSizes">Per queue, the largest size (a power of two ≤ 32768).</param>
    /// <param name="msixVectors">MSI-X table size; vectors 0..n-1 can be mapped.</param>
    /// <param name="onReset">Called after the driver reset the device (status written 0).</param>
    /// <param name="onDriverOk">Called when DRIVER_OK is taken: buffers made available before it may now
    /// be used.</param>
    public VirtioPciCommonConfig(GuestRam ram, ulong deviceFeatures, IReadOnlyList<ushort> queueMaxSizes, ushort msixVectors,
        Action? onReset = null, Action? onDriverOk = null)
    {
        foreach (var max in queueMaxSizes)
            if (max == 0 || max > SplitVirtqueue.MaxSize || (max & (max - 1)) != 0)
                throw new ArgumentException($"queue size {max} is not a power of two up to {SplitVirtqueue.MaxSize}");
        _ram = ram;
        _msixVectors = msixVectors;
        _onReset = onReset ?? (() => { });
        _onDriverOk = onDriverOk ?? (() => { });
        DeviceFeatures = deviceFeatures | VirtioFeatures.Version1;
        _queues = queueMaxSizes.Select(VirtioQueueRegisters.AtReset).ToArray();
        _rings = new SplitVirtqueue?[_queues.Length];
    }

    /// <summary>The ring of queue <paramref name="index"/> while it is enabled, else null.</summary>
    public SplitVirtqueue? Queue(int index) => (uint)index < (uint)_rings.Length ? _rings[index] : null;

    public ushort QueueMsixVectorOf(int index) => (uint)index < (uint)_queues.Length ? _queues[index].MsixVector : NoVector;

    /// <summary>Sets DEVICE_NEEDS_RESET (§2.1.2). Returns true if the bit is new and DRIVER_OK is set: the
    /// device must then send a configuration change notification.</summary>
    public bool MarkNeedsReset()
    {
        if ((Status & VirtioStatus.DeviceNeedsReset) != 0) return false;
        Status |= VirtioStatus.DeviceNeedsReset;
        return (Status & VirtioStatus.DriverOk) != 0;
    }

    /// <summary>Device-specific configuration changed: config_generation moves on (§4.1.4.3.1).</summary>
    public void BumpConfigGeneration() => ConfigGeneration++;

    public ulong Read(ulong offset, int size)
    {
        if (offset >= Length) return 0;
        var o = (int)offset;
        var q = SelectedQueue();
        return (o, size) switch
        {
            (DeviceFeatureSelect, 4) => _deviceFeatureSelect,
            (DeviceFeature, 4) => _deviceFeatureSelect < 2 ? (uint)(DeviceFeatures >> (int)(32 * _deviceFeatureSelect)) : 0,
            (DriverFeatureSelect, 4) => _driverFeatureSelect,
            (DriverFeature, 4) => _driverFeatureSelect < 2 ? (uint)(_driverFeatures >> (int)(32 * _driverFeatureSelect)) : 0,
            (ConfigMsixVectorReg, 2) => _configVector,
            (NumQueues, 2) => (ulong)_queues.Length,
            (DeviceStatus, 1) => Status,
            (ConfigGenerationReg, 1) => ConfigGeneration,
            (QueueSelectReg, 2) => _queueSelect,
            // §4.1.4.3.1: 0 for a queue that does not exist.
            (QueueSize, 2) => q?.Size ?? 0,
            (QueueMsixVector, 2) => q?.MsixVector ?? NoVector,
            (QueueEnable, 2) => q?.Enabled == true ? 1UL : 0,
            (QueueNotifyOff, 2) => q is null ? 0UL : _queueSelect,
            (QueueDesc or QueueDriver or QueueDevice, 8) => q is null ? 0 : Address(q, o),
            (QueueDesc or QueueDriver or QueueDevice, 4) => q is null ? 0 : (uint)Address(q, o),
            (QueueDesc + 4 or QueueDriver + 4 or QueueDevice + 4, 4) => q is null ? 0 : (uint)(Address(q, o - 4) >> 32),
            (QueueNotifyData or QueueReset, 2) => 0,
            _ => 0,
        };
    }

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset >= Length) return;
        var o = (int)offset;
        var v = AccessSize.Mask(value, size);
        switch (o, size)
        {
            case (DeviceFeatureSelect, 4): _deviceFeatureSelect = (uint)v; break;
            case (DriverFeatureSelect, 4): _driverFeatureSelect = (uint)v; break;
            case (DriverFeature, 4): WriteDriverFeatures((uint)v); break;
            case (ConfigMsixVectorReg, 2): _configVector = MapVector((ushort)v); break;
            case (DeviceStatus, 1): WriteStatus((byte)v); break;
            case (QueueSelectReg, 2): _queueSelect = (ushort)v; break;
            case (QueueSize, 2): UpdateQueue(q => q with { Size = (ushort)v }); break;
            case (QueueMsixVector, 2): SetQueueVector((ushort)v); break;
            case (QueueEnable, 2): if (v == 1) EnableQueue(); break;
            case (QueueDesc or QueueDriver or QueueDevice, 8): UpdateQueue(q => WithAddress(q, o, v)); break;
            case (QueueDesc or QueueDriver or QueueDevice, 4):
                UpdateQueue(q => WithAddress(q, o, (Address(q, o) & 0xFFFF_FFFF_0000_0000) | v));
                break;
            case (QueueDesc + 4 or QueueDriver + 4 or QueueDevice + 4, 4):
                UpdateQueue(q => WithAddress(q, o - 4, (Address(q, o - 4) & 0xFFFF_FFFF) | (v << 32)));
                break;
        }
    }

    private VirtioQueueRegisters? SelectedQueue() => _queueSelect < _queues.Length ? _queues[_queueSelect] : null;

    private static ulong Address(VirtioQueueRegisters q, int offset) =>
        offset switch { QueueDesc => q.Desc, QueueDriver => q.Driver, _ => q.Device };

    private static VirtioQueueRegisters WithAddress(VirtioQueueRegisters q, int offset, ulong value) =>
        offset switch
        {
            QueueDesc => q with { Desc = value },
            QueueDriver => q with { Driver = value },
            _ => q with { Device = value },
        };

    /// <summary>Changes the selected queue's configuration, unless it is enabled (or does not exist).</summary>
    private void UpdateQueue(Func<VirtioQueueRegisters, VirtioQueueRegisters> change)
    {
        var q = SelectedQueue();
        if (q is null || q.Enabled) return;
        _queues[_queueSelect] = change(q);
    }

    private void SetQueueVector(ushort vector)
    {
        if (SelectedQueue() is { } q) _queues[_queueSelect] = q with { MsixVector = MapVector(vector) };
    }

    private ushort MapVector(ushort vector) => vector < _msixVectors ? vector : NoVector;

    private void WriteDriverFeatures(uint value)
    {
        if ((Status & VirtioStatus.FeaturesOk) != 0 || _driverFeatureSelect >= 2) return;
        var shift = (int)(32 * _driverFeatureSelect);
        _driverFeatures = (_driverFeatures & ~(0xFFFF_FFFFUL << shift)) | ((ulong)value << shift);
    }

    private void EnableQueue()
    {
        var q = SelectedQueue();
        if (q is null || q.Enabled) return;
        var size = q.Size <= q.MaxSize ? q.Size : (ushort)0; // above the device's maximum: an invalid size
        var ring = SplitVirtqueue.Enable(_ram, size, new GuestPhysAddr(q.Desc), new GuestPhysAddr(q.Driver),
            new GuestPhysAddr(q.Device), _driverFeatures);
        _rings[_queueSelect] = ring;
        _queues[_queueSelect] = q with { Ring = ring.State() };
        if (ring.Error is not null) MarkNeedsReset();
    }

    // Status transitions (§3.1.1), each bit only after the one before it:
    //   0 --ACKNOWLEDGE--> A --DRIVER--> A|D --FEATURES_OK (features valid)--> A|D|F --DRIVER_OK--> live
    //   any --FAILED--> failed;  any --write 0--> reset
    private void WriteStatus(byte value)
    {
        if (value == 0)
        {
            Reset();
            return;
        }
        var added = (byte)(value & ~Status & ~VirtioStatus.DeviceNeedsReset);
        var wasLive = (Status & VirtioStatus.DriverOk) != 0;
        if ((added & VirtioStatus.Acknowledge) != 0) Status |= VirtioStatus.Acknowledge;
        if ((added & VirtioStatus.Driver) != 0 && (Status & VirtioStatus.Acknowledge) != 0) Status |= VirtioStatus.Driver;
        if ((added & VirtioStatus.FeaturesOk) != 0 && (Status & VirtioStatus.Driver) != 0 && FeaturesAcceptable())
            Status |= VirtioStatus.FeaturesOk;
        if ((added & VirtioStatus.DriverOk) != 0 && (Status & VirtioStatus.FeaturesOk) != 0) Status |= VirtioStatus.DriverOk;
        if ((added & VirtioStatus.Failed) != 0) Status |= VirtioStatus.Failed;
        if (!wasLive && IsLive) _onDriverOk();
    }

    private bool FeaturesAcceptable() =>
        (_driverFeatures & ~DeviceFeatures) == 0 && (_driverFeatures & VirtioFeatures.Version1) != 0;

    /// <summary>Device reset (§2.4): status, features, vectors, selectors and every queue back to their
    /// initial values; queues disabled (§4.1.4.3.1: queue_enable reads 0).</summary>
    private void Reset()
    {
        Status = 0;
        _deviceFeatureSelect = 0;
        _driverFeatureSelect = 0;
        _driverFeatures = 0;
        _configVector = NoVector;
        _queueSelect = 0;
        for (var i = 0; i < _queues.Length; i++)
        {
            _queues[i] = VirtioQueueRegisters.AtReset(_queues[i].MaxSize);
            _rings[i] = null;
        }
        _onReset();
    }

    public VirtioPciCommonState State() =>
        new(Status, _deviceFeatureSelect, _driverFeatureSelect, _driverFeatures, _configVector, ConfigGeneration, _queueSelect,
            _queues.Select((q, i) => _rings[i] is { } r ? q with { Ring = r.State() } : q).ToImmutableArray());

    /// <summary>
    /// A common configuration continuing from <paramref name="state"/> after a restart; enabled queues
    /// resume from the used ring in guest memory (<see cref="SplitVirtqueue.FromState"/>). A queue whose
    /// ring no longer makes sense sets DEVICE_NEEDS_RESET.
    /// </summary>
    public static VirtioPciCommonConfig FromState(GuestRam ram, ulong deviceFeatures, ushort msixVectors, VirtioPciCommonState state,
        Action? onReset = null, Action? onDriverOk = null)
    {
        var c = new VirtioPciCommonConfig(ram, deviceFeatures, state.Queues.Select(q => q.MaxSize).ToArray(), msixVectors,
            onReset, onDriverOk)
        {
            Status = state.Status,
            ConfigGeneration = state.ConfigGeneration,
            _deviceFeatureSelect = state.DeviceFeatureSelect,
            _driverFeatureSelect = state.DriverFeatureSelect,
            _driverFeatures = state.DriverFeatures,
            _configVector = state.ConfigMsixVector,
            _queueSelect = state.QueueSelect,
        };
        for (var i = 0; i < state.Queues.Length; i++)
        {
            var q = state.Queues[i];
            c._queues[i] = q;
            if (q.Ring is null) continue;
            var ring = SplitVirtqueue.FromState(ram, q.Ring, state.DriverFeatures);
            c._rings[i] = ring;
            if (ring.Error is not null) c.MarkNeedsReset();
        }
        return c;
    }
}

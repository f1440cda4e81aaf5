namespace ActorVmm.Devices.Virtio;

/// <summary>
/// A virtio device type (virtio 1.2 §5) behind the PCI transport: its features, queues, configuration
/// space and what it does with the buffers of a notified queue. Pure: no Akka, no threads.
/// </summary>
public interface IVirtioDevice
{
    /// <summary>The virtio device ID (§5: 4 = entropy source); the PCI device ID is 0x1040 + it (§4.1.2).</summary>
    ushort DeviceId { get; }

    /// <summary>Device-type feature bits offered (the transport adds the ring and version bits).</summary>
    ulong Features { get; }

    /// <summary>Per queue, the largest size (a power of two up to 32768).</summary>
    IReadOnlyList<ushort> QueueMaxSizes { get; }

    /// <summary>Device-specific configuration (§4.1.4.6); length 0 if the device has none.</summary>
    int ConfigLength { get; }

    ulong ReadConfig(ulong offset, int size);

    void WriteConfig(ulong offset, int size, ulong value);

    /// <summary>Queue <paramref name="queue"/> has (or may have) available chains and the device is live:
    /// take and complete what it can. The transport then decides the interrupt and, if the queue broke,
    /// sets DEVICE_NEEDS_RESET.</summary>
    void Process(int queue, SplitVirtqueue ring);

    /// <summary>The driver reset the device (§2.4): drop device-type state.</summary>
    void Reset();
}

/// <summary>
/// A virtio device type whose host backend brings input of its own accord (a network link), into the
/// buffers of one queue (<see cref="BackendQueue"/>): the owner of the backend says when it has some
/// (<see cref="VirtioPciTransport.BackendReady"/>), as a notification of that queue.
/// </summary>
public interface IVirtioBackendInput
{
    /// <summary>The queue whose buffers the backend's input fills (virtio-net: receiveq1).</summary>
    int BackendQueue { get; }

    /// <summary>The device cannot take input now (not live, the queue not enabled, no bus mastering):
    /// what the backend has is read and dropped, as a receiver that is off drops what reaches it.</summary>
    void DiscardBackendInput();
}

/// <summary>Snapshot of a <see cref="VirtioPciTransport"/>: the common configuration and the ISR byte.</summary>
public sealed record VirtioPciTransportState(VirtioPciCommonState Common, byte Isr, bool IntxAsserted);

/// <summary>
/// The modern virtio-pci transport of one device (virtio 1.2 §4.1) as four register regions, each an
/// <see cref="IBusDevice"/> seen at its own offsets (where a BAR places them is the PCI function's
/// business, described by the vendor capabilities of §4.1.4):
/// <list type="bullet">
/// <item><see cref="Common"/>: the common configuration (§4.1.4.3), <see cref="VirtioPciCommonConfig"/>.</item>
/// <item><see cref="Notify"/>: queue q's notify address is q × <see cref="NotifyOffMultiplier"/>
/// (queue_notify_off = q, §4.1.4.4); the driver writes the queue's index there (§4.1.5.2). The address
/// picks the queue; a write that is not a 16- or 32-bit write at such an address is ignored.</item>
/// <item><see cref="Isr"/>: the ISR status byte (§4.1.4.5): bit 0 queue interrupt, bit 1 configuration
/// change; a read returns it, clears it and drops the INTx line.</item>
/// <item><see cref="DeviceConfig"/>: the device-specific configuration (§4.1.4.6).</item>
/// </list>
/// Interrupts (§4.1.5.3, §4.1.5.4): the ISR bit is set for every notification; with MSI-X enabled (the
/// PCI function's MSI-X Enable, <see cref="MsixEnabled"/>) the queue's or configuration's vector is
/// signalled unless it is NO_VECTOR, otherwise the INTx line is asserted until the ISR is read.
/// </summary>
public sealed class VirtioPciTransport
{
    public const int NotifyOffMultiplier = 4;
    public const byte IsrQueue = 0b01;
    public const byte IsrConfig = 0b10;

    private readonly IVirtioDevice _device;
    private readonly IInterruptLine _intx;
    private readonly Action<ushort> _signalMsix;
    private byte _isr;
    private bool _intxAsserted;

    public VirtioPciCommonConfig Common { get; private set; }
    public IBusDevice Notify { get; }
    public IBusDevice Isr { get; }
    public IBusDevice DeviceConfig { get; }

    /// <summary>Set by the PCI function while MSI-X is enabled in its capability.</summary>
    public bool MsixEnabled { get; set; }

    /// <summary>MSI-X table entries: one per queue and one for configuration changes.</summary>
    public ushort MsixVectors => (ushort)(_device.QueueMaxSizes.Count + 1);

    /// <summary>Offered features: the device's, VIRTIO_F_VERSION_1, EVENT_IDX and INDIRECT_DESC.</summary>
    public ulong OfferedFeatures => _device.Features | VirtioFeatures.Version1 | VirtioFeatures.EventIdx | VirtioFeatures.IndirectDesc;

    public byte IsrStatus => _isr;

    /// <summary>A transport for <paramref name="device"/> over guest RAM <paramref name="ram"/>, with the
    /// function's INTx line and <paramref name="signalMsix"/>, which sends MSI-X vector n of the function
    /// (used while <see cref="MsixEnabled"/>).</summary>
    public VirtioPciTransport(GuestRam ram, IVirtioDevice device, IInterruptLine intx, Action<ushort> signalMsix)
    {
        _device = device;
        _intx = intx;
        _signalMsix = signalMsix;
        Common = new VirtioPciCommonConfig(ram, OfferedFeatures, device.QueueMaxSizes, MsixVectors, OnReset, OnDriverOk);
        Notify = new NotifyRegion(this);
        Isr = new IsrRegion(this);
        DeviceConfig = new ConfigRegion(device);
    }

    public VirtioPciTransportState State() => new(Common.State(), _isr, _intxAsserted);

    /// <summary>A transport continuing from <paramref name="state"/> (the device model is restored by its
    /// owner); queues resume from their used rings in guest memory.</summary>
    public static VirtioPciTransport FromState(GuestRam ram, IVirtioDevice device, IInterruptLine intx, Action<ushort> signalMsix,
        VirtioPciTransportState state)
    {
        var t = new VirtioPciTransport(ram, device, intx, signalMsix);
        t.Common = VirtioPciCommonConfig.FromState(ram, t.OfferedFeatures, t.MsixVectors, state.Common, t.OnReset, t.OnDriverOk);
        t._isr = state.Isr;
        t._intxAsserted = state.IntxAsserted;
        if (t._intxAsserted) intx.Assert();
        return t;
    }

    /// <summary>An available-buffer notification for <paramref name="queue"/> (§4.1.5.2). Ignored unless
    /// the device is live and the queue enabled.</summary>
    public void NotifyQueue(int queue)
    {
        if (!Common.IsLive || Common.Queue(queue) is not { } ring) return;
        _device.Process(queue, ring);
        AfterProcessing(queue, ring);
    }

    /// <summary>
    /// The backend of an <see cref="IVirtioBackendInput"/> device has input: its queue is processed as on a
    /// notification while the device is live, the queue enabled and <paramref name="canAccessMemory"/>
    /// (the PCI function's bus mastering); otherwise the device drops what the backend has (nothing is
    /// written to the guest, and the backend does not stay readable for ever). Other devices ignore it.
    /// </summary>
    public void BackendReady(bool canAccessMemory)
    {
        if (_device is not IVirtioBackendInput backed) return;
        var queue = backed.BackendQueue;
        if (canAccessMemory && Common.IsLive && Common.Queue(queue) is { } ring)
        {
            _device.Process(queue, ring);
            AfterProcessing(queue, ring);
        }
        else backed.DiscardBackendInput();
    }

    /// <summary>The device-specific configuration changed (§4.1.5.4): new generation, and a configuration
    /// change notification once DRIVER_OK is set.</summary>
    public void DeviceConfigChanged()
    {
        Common.BumpConfigGeneration();
        if ((Common.Status & VirtioStatus.DriverOk) != 0) SignalConfig();
    }

    private void AfterProcessing(int queue, SplitVirtqueue ring)
    {
        if (ring.Error is not null)
        {
            if (Common.MarkNeedsReset()) SignalConfig();
            return;
        }
        if (ring.NeedsInterrupt()) SignalQueue(queue);
    }

    private void SignalQueue(int queue) => Signal(IsrQueue, Common.QueueMsixVectorOf(queue));

    private void SignalConfig() => Signal(IsrConfig, Common.ConfigMsixVector);

    private void Signal(byte isrBit, ushort vector)
    {
        _isr |= isrBit;
        if (MsixEnabled)
        {
            if (vector != VirtioPciCommonConfig.NoVector) _signalMsix(vector);
            return;
        }
        if (_intxAsserted) return;
        _intxAsserted = true;
        _intx.Assert();
    }

    private byte ReadIsr()
    {
        var v = _isr;
        _isr = 0;
        if (_intxAsserted)
        {
            _intxAsserted = false;
            _intx.Deassert();
        }
        return v;
    }

    private void OnReset()
    {
        _isr = 0;
        if (_intxAsserted)
        {
            _intxAsserted = false;
            _intx.Deassert();
        }
        _device.Reset();
    }

    // Buffers the driver made available before DRIVER_OK are used now (§2.1.2: not before).
    private void OnDriverOk()
    {
        for (var q = 0; q < Common.QueueCount; q++)
            if (Common.Queue(q) is { HasAvailable: true }) NotifyQueue(q);
    }

    private sealed class NotifyRegion(VirtioPciTransport t) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => 0;

        public void Write(ulong offset, int size, ulong value)
        {
            if (size is not (2 or 4) || offset % NotifyOffMultiplier != 0) return;
            var queue = offset / NotifyOffMultiplier;
            if (queue < (ulong)t.Common.QueueCount) t.NotifyQueue((int)queue);
        }
    }

    private sealed class IsrRegion(VirtioPciTransport t) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => offset == 0 ? t.ReadIsr() : 0UL;

        public void Write(ulong offset, int size, ulong value) { }
    }

    private sealed class ConfigRegion(IVirtioDevice device) : IBusDevice
    {
        public ulong Read(ulong offset, int size) =>
            offset < (ulong)device.ConfigLength && AccessSize.IsValid(size) ? device.ReadConfig(offset, size) : 0;

        public void Write(ulong offset, int size, ulong value)
        {
            if (offset < (ulong)device.ConfigLength && AccessSize.IsValid(size)) device.WriteConfig(offset, size, value);
        }
    }
}

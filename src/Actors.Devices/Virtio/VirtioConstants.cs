namespace ActorVmm.Devices.Virtio;

/// <summary>Device status bits (virtio 1.2 §2.1). The driver sets them in this order:
/// ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK (§3.1.1); writing 0 resets the device (§2.4).</summary>
public static class VirtioStatus
{
    public const byte Acknowledge = 0b0000_0001;
    public const byte Driver = 0b0000_0010;
    public const byte DriverOk = 0b0000_0100;
    public const byte FeaturesOk = 0b0000_1000;
    /// <summary>Set by the device only: it hit an error it cannot recover from without a reset (§2.1.2).</summary>
    public const byte DeviceNeedsReset = 0b0100_0000;
    public const byte Failed = 0b1000_0000;
}

/// <summary>Transport and ring feature bits (virtio 1.2 §6), as masks of the 64-bit feature word.</summary>
public static class VirtioFeatures
{
    /// <summary>VIRTIO_F_INDIRECT_DESC (28): descriptors may point to an indirect table (§2.7.5.3).</summary>
    public const ulong IndirectDesc = 1UL << 28;
    /// <summary>VIRTIO_F_EVENT_IDX (29): used_event / avail_event suppress notifications (§2.7.7, §2.7.10).</summary>
    public const ulong EventIdx = 1UL << 29;
    /// <summary>VIRTIO_F_VERSION_1 (32): a modern (non-legacy) device; a device MUST offer it (§6.2) and
    /// this model refuses FEATURES_OK without it.</summary>
    public const ulong Version1 = 1UL << 32;
}

/// <summary>Split-virtqueue descriptor and ring flags (virtio 1.2 §2.7.5, §2.7.6, §2.7.8).</summary>
public static class VirtqFlags
{
    /// <summary>virtq_desc.flags: the chain continues at <c>next</c>.</summary>
    public const ushort DescNext = 0b0001;
    /// <summary>virtq_desc.flags: the buffer is device write-only (else device read-only).</summary>
    public const ushort DescWrite = 0b0010;
    /// <summary>virtq_desc.flags: the buffer is a table of descriptors (§2.7.5.3).</summary>
    public const ushort DescIndirect = 0b0100;
    /// <summary>virtq_avail.flags without EVENT_IDX: the driver wants no used-buffer notification (§2.7.7).</summary>
    public const ushort AvailNoInterrupt = 0b0001;
    /// <summary>virtq_used.flags without EVENT_IDX: the device wants no available-buffer notification (§2.7.10).</summary>
    public const ushort UsedNoNotify = 0b0001;
}

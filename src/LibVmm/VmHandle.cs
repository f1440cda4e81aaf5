namespace ActorVmm.LibVmm;

/// <summary>One KVM VM: memslots, vcpus and VM-wide settings.</summary>
public sealed unsafe class VmHandle : IDisposable
{
    /// <summary>Where KVM's real-mode TSS (3 pages) and identity map page live: just below the
    /// firmware's 4 GiB alias, inside the MMIO hole, never RAM.</summary>
    public const ulong TssAddress = 0xFFFB_D000;
    public const ulong IdentityMapAddress = 0xFFFB_C000;

    private readonly Kvm _kvm;
    private int _fd;

    public int Fd => _fd;
    public Kvm System => _kvm;

    internal VmHandle(Kvm kvm, int fd)
    {
        _kvm = kvm;
        _fd = fd;
        if (Native.Ioctl(fd, KvmIoctl.SetTssAddr, unchecked((nint)TssAddress)) < 0) throw KvmException.Last("KVM_SET_TSS_ADDR");
        var map = IdentityMapAddress;
        if (_kvm.CheckExtension(KvmCap.SetIdentityMapAddr) > 0 &&
            Native.Ioctl(fd, KvmIoctl.SetIdentityMapAddr, &map) < 0)
            throw KvmException.Last("KVM_SET_IDENTITY_MAP_ADDR");
    }

    /// <summary>KVM_SET_USER_MEMORY_REGION. A size of 0 deletes the slot.</summary>
    public void SetUserMemoryRegion(uint slot, GuestPhysAddr guestAddress, ulong size, nint hostAddress, bool readOnly = false)
    {
        var region = new KvmUserspaceMemoryRegion
        {
            Slot = slot,
            Flags = readOnly ? KvmUserspaceMemoryRegion.ReadOnly : 0,
            GuestPhysAddr = guestAddress.Value,
            MemorySize = size,
            UserspaceAddr = (ulong)hostAddress,
        };
        if (Native.Ioctl(_fd, KvmIoctl.SetUserMemoryRegion, &region) < 0)
            throw KvmException.Last($"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {guestAddress}, size 0x{size:X})");
    }

    /// <summary>KVM_ENABLE_CAP on the VM.</summary>
    public void EnableCap(KvmCap cap, ulong arg0 = 0)
    {
        var c = new KvmEnableCap { Cap = (uint)cap };
        c.Args[0] = arg0;
        if (Native.Ioctl(_fd, KvmIoctl.EnableCap, &c) < 0) throw KvmException.Last($"KVM_ENABLE_CAP({cap})");
    }

    /// <summary>KVM_CREATE_VCPU, maps its kvm_run page and applies the CPUID policy.</summary>
    public VcpuHandle CreateVcpu(int id, CpuidPolicy cpuid)
    {
        var fd = Native.Ioctl(_fd, KvmIoctl.CreateVcpu, id);
        if (fd < 0) throw KvmException.Last($"KVM_CREATE_VCPU({id})");
        var vcpu = new VcpuHandle(id, fd, _kvm.VcpuMmapSize);
        try
        {
            vcpu.SetCpuid(cpuid.EntriesFor(id));
        }
        catch
        {
            vcpu.Dispose();
            throw;
        }
        return vcpu;
    }

    public void Dispose()
    {
        if (_fd > 0) Native.Close(_fd);
        _fd = -1;
    }
}

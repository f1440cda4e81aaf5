using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

// Saving and restoring everything KVM holds of a vcpu (snapshot/restore).
public sealed unsafe partial class VcpuHandle
{
    private uint[]? _msrsToSave;

    /// <summary>
    /// Reads everything KVM holds of this vcpu. On the vcpu's thread, outside KVM_RUN, with the last
    /// exit answered (the value of an IN, MMIO read or RDMSR supplied). KVM completes an I/O, MMIO or
    /// MSR exit only when KVM_RUN is entered again (api.rst, KVM_RUN: "the corresponding operations
    /// are complete (and guest state is consistent) only after userspace has re-entered the kernel
    /// with KVM_RUN"; until then RIP still points at the OUT), so this first enters with immediate_exit
    /// set: KVM finishes the operation and returns without running a guest instruction. The vcpu
    /// can be run on afterwards. The MP state is read next: with KVM's local APIC,
    /// KVM_GET_MP_STATE first accepts a pending INIT or SIPI, which can change CS and RIP.
    /// The x87/SSE state is read with KVM_GET_FPU, and with KVM_GET_XSAVE too whenever KVM has
    /// KVM_CAP_XSAVE, whatever the guest's CPUID says (as QEMU does): on an XSAVE host KVM_SET_FPU
    /// alone does not bring it back (seen with Linux 6.12's kvm_amd: the restored guest found FCW
    /// 0x37F, MXCSR 0x1F80 and zeroed x87 and XMM registers), so restore writes the XSAVE image after it.
    /// </summary>
    public VcpuKvmState SaveState()
    {
        var vm = _vm ?? throw new InvalidOperationException($"vcpu {Id} has no VM: its state cannot be saved");
        var kvm = vm.System;
        FinishPendingExit();
        KvmMpState? mpState = vm.SplitIrqchip ? GetMpState() : null;
        var regs = GetRegisters();
        var sregs = GetSpecialRegisters();
        var fpu = GetFpu();
        var xsave = kvm.CheckExtension(KvmCap.Xsave) > 0 ? GetXsave() : null;
        var xcrs = kvm.CheckExtension(KvmCap.Xcrs) > 0 ? GetXcrs() : [];
        var msrs = ReadMsrs(_msrsToSave ??= SavedMsrs.ToSave(GetMsrIndexList(kvm), vm.SplitIrqchip));
        var lapic = vm.SplitIrqchip ? GetLapic() : null;
        var debug = GetDebugRegs();
        var events = GetVcpuEvents();
        return new VcpuKvmState
        {
            Registers = VcpuKvmState.Image(regs),
            SpecialRegisters = VcpuKvmState.Image(sregs),
            Fpu = VcpuKvmState.Image(fpu),
            Xsave = xsave,
            Xcrs = xcrs,
            DebugRegisters = VcpuKvmState.Image(debug),
            Msrs = msrs,
            Events = VcpuKvmState.Image(events),
            MpState = mpState,
            Lapic = lapic,
        };
    }

    /// <summary>
    /// Writes <paramref name="state"/> into this vcpu (a fresh one, of a VM built as the saved one was,
    /// with the same CPUID, its memory in place and its clock restored first: see
    /// <see cref="VmHandle.RestoreClock"/>). On the vcpu's thread, outside KVM_RUN. The order is KVM's:
    /// <list type="number">
    /// <item>general registers: KVM_SET_REGS drops a pending exception (x86.c __set_regs), so they
    /// come before the vcpu events;</item>
    /// <item>special registers: CR0/CR4/EFER and the APIC base and mode (x2APIC), which KVM_SET_LAPIC
    /// reads the image by (api.rst: the APIC ID's place in the image depends on the mode);</item>
    /// <item>FPU, XSAVE, XCRs;</item>
    /// <item>the local APIC image (KVM's APIC only), after the special registers;</item>
    /// <item>the MSRs, after the local APIC: IA32_TSC first, made to continue from its saved value
    /// (below), IA32_TSC_DEADLINE last (KVM drops it unless the restored LVT timer is in TSC-deadline
    /// mode, and it is absolute in the TSC just restored);</item>
    /// <item>the MP state, after the local APIC: KVM keeps SIPI_RECEIVED as a SIPI pending in the APIC
    /// (x86.c kvm_arch_vcpu_ioctl_set_mpstate);</item>
    /// <item>debug registers;</item>
    /// <item>vcpu events last: pending/injected exception, interrupt and NMI, the interrupt shadow,
    /// the NMI mask and SIPI vector, which the writes above may clear or re-queue.</item>
    /// </list>
    /// The TSC: a host-initiated write of IA32_TSC goes through KVM's kvm_synchronize_tsc, which
    /// may replace the value with the offset of an earlier write when the two are within one second
    /// of TSC time (KVM's way of keeping the vcpus of one VM in step; before Linux 6.8 also against
    /// the write KVM makes when it creates the vcpu). When the TSC then reads below its saved value and
    /// KVM has the vcpu's KVM_VCPU_TSC_OFFSET attribute, the offset is moved forward so the TSC
    /// continues from the saved value: the guest's TSC never goes backwards. A match that put it
    /// ahead (at most KVM's one second) is kept, so the vcpus stay on one offset.
    /// Throws <see cref="ArgumentException"/> for a malformed state and <see cref="KvmException"/> when
    /// KVM refuses a part (naming it), e.g. an MSR this KVM does not have.
    /// </summary>
    public void RestoreState(VcpuKvmState state)
    {
        ArgumentNullException.ThrowIfNull(state);
        state.Validate();
        var vm = _vm ?? throw new InvalidOperationException($"vcpu {Id} has no VM: no state can be restored into it");
        if ((state.Lapic is not null) != vm.SplitIrqchip)
            throw new ArgumentException(state.Lapic is null
                ? $"vcpu {Id}: the VM has KVM's local APIC but the saved vcpu has none"
                : $"vcpu {Id}: the saved vcpu has KVM's local APIC but this VM has none", nameof(state));

        SetRegisters(state.GetRegs());
        SetSpecialRegisters(state.GetSregs());
        SetFpu(state.GetFpu());
        if (state.Xsave is { } xsave) SetXsave(xsave);
        if (state.Xcrs.Length > 0) SetXcrs(state.Xcrs);
        if (state.Lapic is { } lapic) SetLapic(lapic);
        var msrs = state.Msrs;
        if (state.Tsc is { } tsc)
        {
            ContinueTsc(tsc);
            msrs = [.. msrs.Where(m => m.Index != SavedMsrs.Tsc)];
        }
        // Only what differs from the fresh vcpu: KVM refuses some writes of a feature's reset value
        // when the host lacks the feature (e.g. steal time without schedstats) though it reads them.
        var fresh = ReadMsrs([.. msrs.Select(m => m.Index)]).ToDictionary(m => m.Index, m => m.Value);
        var changed = msrs.Where(m => !fresh.TryGetValue(m.Index, out var v) || v != m.Value)
            .Select(m => new KvmMsrEntry { Index = m.Index, Data = m.Value }).ToArray();
        if (changed.Length > 0) SetMsrs(changed);
        if (state.MpState is { } mp) SetMpState(mp);
        SetDebugRegs(state.GetDebugRegs());
        var events = state.GetVcpuEvents();
        // GET reports which fields it filled; SET also takes the pending NMI and the SIPI vector.
        events.Flags |= KvmVcpuEvents.ValidNmiPending | KvmVcpuEvents.ValidSipiVector;
        SetVcpuEvents(events);
    }

    /// <summary>KVM_RUN with immediate_exit set: KVM completes the operation of the last exit (advancing
    /// RIP past an OUT, storing an IN's value) and returns EINTR before any guest instruction. Throws
    /// when completing it made a further exit (e.g. the next iteration of a REP OUTS): the caller must
    /// handle that one before saving.</summary>
    private void FinishPendingExit()
    {
        var page = RunPage;
        page.ImmediateExit = true;
        int result;
        try
        {
            result = Enter();
        }
        finally
        {
            page.ImmediateExit = false;
        }
        if (result == 0)
            throw new InvalidOperationException($"vcpu {Id}: completing the last exit made another ({RunPage.ExitReason}); handle it before saving");
        var errno = Marshal.GetLastPInvokeError();
        if (errno is not (Native.EINTR or Native.EAGAIN)) throw new KvmException($"KVM_RUN(vcpu {Id}, immediate exit)", errno);
    }

    /// <summary>Writes IA32_TSC = <paramref name="saved"/> and makes sure the guest's TSC reads at least
    /// that (see <see cref="RestoreState"/>).</summary>
    private void ContinueTsc(ulong saved)
    {
        SetMsrs(new KvmMsrEntry { Index = SavedMsrs.Tsc, Data = saved });
        var now = GetGuestTsc();
        if (now >= saved || !HasTscOffsetAttribute()) return;
        // guest TSC = scaled host TSC + offset: moving the offset by the shortfall moves the TSC by it.
        SetTscOffset(GetTscOffset() + (saved - now));
    }

    /// <summary>Whether KVM has this vcpu's KVM_VCPU_TSC_OFFSET attribute (Linux 5.16 and later).</summary>
    public bool HasTscOffsetAttribute()
    {
        if (_vm is not { } vm || vm.System.CheckExtension(KvmCap.VcpuAttributes) <= 0) return false;
        var attr = new KvmDeviceAttr { Group = KvmDeviceAttr.GroupTscControl, Attr = KvmDeviceAttr.AttrTscOffset };
        // SAFETY: attr is a local of the 24-byte layout the ioctl number encodes; KVM only reads it.
        return Native.Ioctl(_fd, KvmStateIoctl.HasDeviceAttr, &attr) == 0;
    }

    /// <summary>KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET): guest TSC = scaled host TSC + this.</summary>
    public ulong GetTscOffset()
    {
        ulong offset;
        var attr = new KvmDeviceAttr { Group = KvmDeviceAttr.GroupTscControl, Attr = KvmDeviceAttr.AttrTscOffset, Addr = (ulong)&offset };
        // SAFETY: attr.Addr points at a local ulong that outlives the call; KVM writes 8 bytes there.
        if (Native.Ioctl(_fd, KvmStateIoctl.GetDeviceAttr, &attr) < 0) throw KvmException.Last($"KVM_GET_DEVICE_ATTR(TSC offset, vcpu {Id})");
        return offset;
    }

    /// <summary>KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET).</summary>
    public void SetTscOffset(ulong offset)
    {
        var attr = new KvmDeviceAttr { Group = KvmDeviceAttr.GroupTscControl, Attr = KvmDeviceAttr.AttrTscOffset, Addr = (ulong)&offset };
        // SAFETY: attr.Addr points at the parameter, which outlives the call; KVM reads 8 bytes there.
        if (Native.Ioctl(_fd, KvmStateIoctl.SetDeviceAttr, &attr) < 0) throw KvmException.Last($"KVM_SET_DEVICE_ATTR(TSC offset 0x{offset:X}, vcpu {Id})");
    }

    /// <summary>
    /// KVM_GET_MSRS of <paramref name="indices"/>, skipping those KVM cannot read on this vcpu (it
    /// stops at the first such MSR and returns how many it read before it).
    /// </summary>
    private MsrValue[] ReadMsrs(uint[] indices)
    {
        var values = new List<MsrValue>(indices.Length);
        var from = 0;
        while (from < indices.Length)
        {
            var read = GetMsrs(indices[from..]);
            values.AddRange(read.Select(e => new MsrValue(e.Index, e.Data)));
            from += read.Length + 1; // the one after those read is the one KVM refused
        }
        return [.. values];
    }

    public KvmVcpuEvents GetVcpuEvents()
    {
        KvmVcpuEvents events;
        // SAFETY: a local of the 64-byte layout the ioctl number encodes; KVM writes all of it.
        if (Native.Ioctl(_fd, KvmStateIoctl.GetVcpuEvents, &events) < 0) throw KvmException.Last($"KVM_GET_VCPU_EVENTS(vcpu {Id})");
        return events;
    }

    public void SetVcpuEvents(in KvmVcpuEvents events)
    {
        // SAFETY: the pinned struct has the 64-byte layout the ioctl number encodes; KVM only reads it.
        fixed (KvmVcpuEvents* p = &events)
            if (Native.Ioctl(_fd, KvmStateIoctl.SetVcpuEvents, p) < 0) throw KvmException.Last($"KVM_SET_VCPU_EVENTS(vcpu {Id})");
    }

    public KvmDebugRegs GetDebugRegs()
    {
        KvmDebugRegs regs;
        // SAFETY: a local of the 128-byte layout the ioctl number encodes; KVM writes all of it.
        if (Native.Ioctl(_fd, KvmStateIoctl.GetDebugRegs, &regs) < 0) throw KvmException.Last($"KVM_GET_DEBUGREGS(vcpu {Id})");
        return regs;
    }

    public void SetDebugRegs(in KvmDebugRegs regs)
    {
        // SAFETY: the pinned struct has the 128-byte layout the ioctl number encodes; KVM only reads it.
        fixed (KvmDebugRegs* p = &regs)
            if (Native.Ioctl(_fd, KvmStateIoctl.SetDebugRegs, p) < 0) throw KvmException.Last($"KVM_SET_DEBUGREGS(vcpu {Id})");
    }

    /// <summary>KVM_GET_XSAVE: the 4 KiB XSAVE image (legacy region, header, extended components).</summary>
    public byte[] GetXsave()
    {
        var image = new byte[KvmStateSizes.Xsave];
        // SAFETY: the pinned array is the 4096 bytes the ioctl number encodes; KVM writes within it.
        fixed (byte* p = image)
            if (Native.Ioctl(_fd, KvmStateIoctl.GetXsave, p) < 0) throw KvmException.Last($"KVM_GET_XSAVE(vcpu {Id})");
        return image;
    }

    public void SetXsave(ReadOnlySpan<byte> image)
    {
        if (image.Length != KvmStateSizes.Xsave) throw new ArgumentException($"an XSAVE image is {KvmStateSizes.Xsave} bytes, not {image.Length}", nameof(image));
        // SAFETY: the pinned span is the 4096 bytes the ioctl number encodes; KVM only reads it.
        fixed (byte* p = image)
            if (Native.Ioctl(_fd, KvmStateIoctl.SetXsave, p) < 0) throw KvmException.Last($"KVM_SET_XSAVE(vcpu {Id})");
    }

    public XcrValue[] GetXcrs()
    {
        var buffer = new byte[KvmStateSizes.Xcrs];
        // SAFETY: the pinned array is the 392 bytes of struct kvm_xcrs the ioctl number encodes.
        fixed (byte* p = buffer)
            if (Native.Ioctl(_fd, KvmStateIoctl.GetXcrs, p) < 0) throw KvmException.Last($"KVM_GET_XCRS(vcpu {Id})");
        var n = Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(buffer), KvmStateSizes.MaxXcrs);
        var xcrs = new XcrValue[n];
        for (var i = 0; i < n; i++)
            xcrs[i] = new XcrValue(BinaryPrimitives.ReadUInt32LittleEndian(buffer.AsSpan(8 + 16 * i)),
                BinaryPrimitives.ReadUInt64LittleEndian(buffer.AsSpan(16 + 16 * i)));
        return xcrs;
    }

    public void SetXcrs(IReadOnlyList<XcrValue> xcrs)
    {
        if (xcrs.Count > KvmStateSizes.MaxXcrs) throw new ArgumentException($"at most {KvmStateSizes.MaxXcrs} XCRs", nameof(xcrs));
        var buffer = new byte[KvmStateSizes.Xcrs];
        BinaryPrimitives.WriteUInt32LittleEndian(buffer, (uint)xcrs.Count);
        for (var i = 0; i < xcrs.Count; i++)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(buffer.AsSpan(8 + 16 * i), xcrs[i].Index);
            BinaryPrimitives.WriteUInt64LittleEndian(buffer.AsSpan(16 + 16 * i), xcrs[i].Value);
        }
        // SAFETY: the pinned array is the 392 bytes of struct kvm_xcrs the ioctl number encodes.
        fixed (byte* p = buffer)
            if (Native.Ioctl(_fd, KvmStateIoctl.SetXcrs, p) < 0) throw KvmException.Last($"KVM_SET_XCRS(vcpu {Id})");
    }

    /// <summary>KVM_GET_MSR_INDEX_LIST: the MSRs this KVM saves and restores (msrs_to_save and emulated_msrs).</summary>
    private static uint[] GetMsrIndexList(Kvm kvm)
    {
        uint count = 0;
        // SAFETY: a struct kvm_msr_list of nmsrs = 0: KVM writes only the count back (E2BIG).
        Native.Ioctl(kvm.Fd, KvmIoctl.GetMsrIndexList, &count);
        for (var attempt = 0; attempt < 4; attempt++)
        {
            var buffer = new uint[1 + count];
            buffer[0] = count;
            // SAFETY: the pinned buffer is struct kvm_msr_list with room for the nmsrs indices it names.
            fixed (uint* p = buffer)
            {
                if (Native.Ioctl(kvm.Fd, KvmIoctl.GetMsrIndexList, p) == 0) return buffer[1..(int)(1 + Math.Min(p[0], count))];
                if (Marshal.GetLastPInvokeError() != Native.E2BIG) throw KvmException.Last("KVM_GET_MSR_INDEX_LIST");
                count = p[0];
            }
        }
        throw new KvmException("KVM_GET_MSR_INDEX_LIST: the list kept growing");
    }
}

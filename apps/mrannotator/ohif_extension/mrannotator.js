/**
 * MRAnnotator's MONAI Label workflow for the OHIF 3.13 viewer the server serves at /viewer/.
 *
 * Plain JavaScript, loaded at run time by app-config.js (written by lib/monailabel_adapter/ohif_viewer.py):
 * no OHIF rebuild. It adds
 *   - an extension `mrannotator` with five commands (mraNextStudy, mraRunModel, mraAddPoint, mraRemovePoint,
 *     mraSaveLabel), and
 *   - a mode `mrannotator` (route /viewer/mrannotator): OHIF's segmentation mode (segmentation panel, brush,
 *     eraser, segment add / rename / delete) plus five toolbar buttons: Next study, Run model, Add point,
 *     Remove point, Save label; on entering it, OHIF's statistics handler is kept from undoing a segment
 *     picked in the panel (keepPanelState, below).
 * The server's side is lib/monailabel_adapter/annotate.py. Labels travel as one frame per SOPInstanceUID,
 * in the instance's own pixel order (what cornerstone's labelmap images hold); the server maps instance
 * UIDs to its image grid with the project's DICOM reader, so nothing here knows slice order or orientation.
 * Every request carries the viewer's Authorization header when it has one (OIDC login).
 *
 * Click correction: "Add point" / "Remove point" arm the viewport (until pressed again or Esc); each click on
 * the image, for the segment active in the panel, sends all clicks so far for that segment plus the label as
 * the viewer holds it to POST /annotate/refine (lib/monailabel_adapter/annotate_refine.py), and the corrected
 * label replaces the labelmap. A click is sent as the instance shown and its row and column (from the
 * instance's own ImagePositionPatient / ImageOrientationPatient / PixelSpacing), never as a position.
 */

const MODE_ID = 'mrannotator';
const STRATEGY = 'random';
const BUTTONS = [
  { id: 'MRANextStudy', label: 'Next study', icon: 'next-arrow', command: 'mraNextStudy' },
  { id: 'MRARunModel', label: 'Run model', icon: 'icon-play', command: 'mraRunModel' },
  { id: 'MRAAddPoint', label: 'Add point', icon: 'Plus', command: 'mraAddPoint' },
  { id: 'MRARemovePoint', label: 'Remove point', icon: 'Minus', command: 'mraRemovePoint' },
  { id: 'MRASaveLabel', label: 'Save label', icon: 'checkbox-checked', command: 'mraSaveLabel' },
];
const pointMode = { kind: null, clicks: new Map(), busy: false }; // kind: 'foreground' | 'background' | null

function serverUrl(path) {
  const base = (window.PUBLIC_URL || '/viewer/').replace(/viewer\/?$/, '');
  return `${window.location.origin}${base}${path}`;
}

async function bytesToBase64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

async function pipe(bytes, stream) {
  const out = await new Response(new Blob([bytes]).stream().pipeThrough(stream)).arrayBuffer();
  return new Uint8Array(out);
}

async function encodeFrame(pixels) {
  return bytesToBase64(await pipe(pixels, new CompressionStream('deflate')));
}

async function decodeFrame(text) {
  const bytes = Uint8Array.from(atob(text), c => c.charCodeAt(0));
  return pipe(bytes, new DecompressionStream('deflate'));
}

function createCommands({ servicesManager, extensionManager }) {
  const services = servicesManager.services;
  const libraries = () =>
    extensionManager.getModuleEntry('@ohif/extension-cornerstone.utilityModule.common').exports
      .getCornerstoneLibraries();

  function notify(type, title, message, duration = 5000) {
    services.uiNotificationService.show({ title, message, type, duration });
  }

  async function call(method, path, body) {
    const auth = services.userAuthenticationService?.getAuthorizationHeader?.() || {};
    const headers = { ...auth };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(serverUrl(path), { method, headers, body });
    const text = await response.text();
    let data;
    try {
      data = JSON.parse(text);
    } catch (e) {
      data = { detail: text };
    }
    if (!response.ok) {
      const detail = typeof data.detail === 'string' ? data.detail : JSON.stringify(data.detail ?? data);
      throw new Error(`${response.status}: ${detail}`);
    }
    return data;
  }

  function current() {
    const viewportId = services.viewportGridService.getActiveViewportId();
    const viewport = services.viewportGridService.getState().viewports.get(viewportId);
    const uids = viewport?.displaySetInstanceUIDs || [];
    const displaySets = uids.map(uid => services.displaySetService.getDisplaySetByUID(uid));
    const displaySet = displaySets.find(ds => ds && ds.imageIds?.length && ds.Modality !== 'SEG');
    if (!displaySet) throw new Error('open an MR series in the viewport first');
    return { viewportId, displaySet };
  }

  function instanceUid(imageId) {
    const { cornerstone } = libraries();
    const instance = cornerstone.metaData.get('instance', imageId);
    const uid = instance?.SOPInstanceUID || cornerstone.metaData.get('sopCommonModule', imageId)?.sopInstanceUID;
    if (!uid) throw new Error(`no SOPInstanceUID for image ${imageId}`);
    return uid;
  }

  function labelmapImages(segmentationId) {
    const { cornerstone } = libraries();
    const segmentation = services.segmentationService.getSegmentation(segmentationId);
    const labelmap = segmentation?.representationData?.Labelmap;
    if (!labelmap?.imageIds?.length) throw new Error('the segmentation has no labelmap images');
    return labelmap.imageIds.map((imageId, i) => {
      const image = cornerstone.cache.getImage(imageId);
      const pixels = image.voxelManager?.getScalarData?.() ?? image.getPixelData();
      return { pixels, referencedImageId: labelmap.referencedImageIds?.[i] ?? image.referencedImageId };
    });
  }

  async function showProposal(answer, viewportId, displaySet) {
    const { cornerstoneTools } = libraries();
    const segments = {};
    answer.segments.forEach((s, i) => {
      segments[s.value] = { segmentIndex: s.value, label: s.name, color: [...s.color, 255], active: i === 0 };
    });
    const segmentationId = await services.segmentationService.createLabelmapForDisplaySet(displaySet, {
      label: `Proposal (${answer.model})`,
      segments,
    });
    for (const { pixels, referencedImageId } of labelmapImages(segmentationId)) {
      const frame = answer.frames[instanceUid(referencedImageId)];
      if (frame) pixels.set(await decodeFrame(frame));
    }
    await services.segmentationService.addSegmentationRepresentation(viewportId, { segmentationId });
    for (const s of answer.segments) {
      services.segmentationService.setSegmentColor?.(viewportId, segmentationId, s.value, [...s.color, 255]);
    }
    cornerstoneTools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(segmentationId);
    return segmentationId;
  }

  function segmentationOf(viewportId, displaySet) {
    const ids = new Set(displaySet.imageIds);
    const active = services.segmentationService.getActiveSegmentation?.(viewportId);
    const all = [active, ...services.segmentationService.getSegmentations()].filter(Boolean);
    const found = all.find(s => (s.representationData?.Labelmap?.referencedImageIds || []).some(id => ids.has(id)));
    if (!found) throw new Error('no labelmap segmentation on this series: run the model or add a segmentation');
    return found;
  }

  async function labelOf(segmentation) {
    // cornerstone may keep a segment in another labelmap layer (overlapping segments) or under another pixel
    // value: the frames read below are the primary layer's, so say so rather than drop a segment silently
    const labelmap = segmentation.representationData.Labelmap;
    const segments = {};
    for (const [index, segment] of Object.entries(segmentation.segments || {})) {
      if (!segment) continue;
      const binding = labelmap.segmentBindings?.[index];
      if (binding && labelmap.primaryLabelmapId && binding.labelmapId !== labelmap.primaryLabelmapId) {
        throw new Error(`segment "${segment.label}" is kept in a separate labelmap layer (overlapping segments); ` +
                        'this save sends one label map: remove the overlap or the segment, then save again');
      }
      segments[binding?.labelValue ?? index] = segment.label;
    }
    const frames = {};
    for (const { pixels, referencedImageId } of labelmapImages(segmentation.segmentationId)) {
      if (pixels.some(v => v !== 0)) frames[instanceUid(referencedImageId)] = await encodeFrame(Uint8Array.from(pixels));
    }
    return { segments, frames };
  }

  function pointOnInstance(event) {
    // the instance shown under the mouse and the pixel clicked (row, column), from the instance's own geometry
    const { cornerstone } = libraries();
    const element = event.target.closest?.('[data-viewport-uid]');
    if (!element) return null;
    const viewport = cornerstone.getEnabledElement(element)?.viewport;
    const canvas = element.querySelector('canvas');
    if (!viewport || !canvas) return null;
    const rect = canvas.getBoundingClientRect();
    const world = viewport.canvasToWorld([event.clientX - rect.left, event.clientY - rect.top]);
    const imageId = viewport.getCurrentImageId?.();
    const meta = imageId && cornerstone.metaData.get('instance', imageId);
    if (!meta?.ImagePositionPatient || !meta.ImageOrientationPatient || !meta.PixelSpacing) {
      throw new Error('click correction needs a slice of the acquisition plane: reset the viewport orientation');
    }
    const [x, y, z] = meta.ImagePositionPatient.map(Number);
    const d = [world[0] - x, world[1] - y, world[2] - z];
    const o = meta.ImageOrientationPatient.map(Number);
    const along = (u, v) => u[0] * v[0] + u[1] * v[1] + u[2] * v[2];
    const rowDir = o.slice(0, 3), colDir = o.slice(3, 6);
    const normal = [rowDir[1] * colDir[2] - rowDir[2] * colDir[1], rowDir[2] * colDir[0] - rowDir[0] * colDir[2],
                    rowDir[0] * colDir[1] - rowDir[1] * colDir[0]];
    const thickness = Number(meta.SliceThickness || meta.SpacingBetweenSlices || 1);
    if (Math.abs(along(d, normal)) > Math.max(thickness, 1)) {
      throw new Error('the click is not on an acquired slice: reset the viewport to the acquisition plane');
    }
    const column = Math.round(along(d, rowDir) / Number(meta.PixelSpacing[1]));
    const row = Math.round(along(d, colDir) / Number(meta.PixelSpacing[0]));
    if (row < 0 || column < 0 || row >= meta.Rows || column >= meta.Columns) return null; // off the image
    return { instance: instanceUid(imageId), row, column };
  }

  async function refineAt(point) {
    const { cornerstoneTools } = libraries();
    const { viewportId, displaySet } = current();
    const segmentation = segmentationOf(viewportId, displaySet);
    const active = services.segmentationService.getActiveSegment?.(viewportId);
    if (!active) throw new Error('pick the structure to correct in the segmentation panel first');
    const key = `${segmentation.segmentationId}/${active.segmentIndex}`;
    const clicks = pointMode.clicks.get(key) || { foreground: [], background: [] };
    clicks[pointMode.kind].push(point);
    const body = { label: active.label, foreground: clicks.foreground, background: clicks.background,
                   ...(await labelOf(segmentation)) };
    const series = encodeURIComponent(displaySet.SeriesInstanceUID);
    const answer = await call('POST', `annotate/refine?image=${series}`, JSON.stringify(body));
    pointMode.clicks.set(key, clicks);
    for (const { pixels, referencedImageId } of labelmapImages(segmentation.segmentationId)) {
      const frame = answer.frames[instanceUid(referencedImageId)];
      if (frame) pixels.set(await decodeFrame(frame));
      else pixels.fill(0);
    }
    cornerstoneTools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(
      segmentation.segmentationId);
    const n = clicks.foreground.length + clicks.background.length;
    notify('success', 'Click correction', `${active.label}: ${answer.changed} voxels changed (click ${n})`, 3000);
  }

  async function onPointerDown(event) {
    if (!pointMode.kind || event.button !== 0) return;
    let point;
    try {
      point = pointOnInstance(event);
    } catch (e) {
      event.stopPropagation();
      notify('error', 'Click correction failed', e.message, 15000);
      return;
    }
    if (!point) return; // not on an image: let OHIF have it
    event.stopPropagation(); // the click is a prompt, not a brush stroke or a window/level drag
    event.preventDefault();
    if (pointMode.busy) return;
    pointMode.busy = true;
    try {
      await refineAt(point);
    } catch (e) {
      notify('error', 'Click correction failed', e.message, 15000);
    } finally {
      pointMode.busy = false;
    }
  }

  function arm(kind) {
    if (!pointMode.listening) {
      window.addEventListener('mousedown', onPointerDown, true); // capture: ahead of cornerstone's tools
      window.addEventListener('keydown', e => {
        if (e.key === 'Escape') pointMode.kind = null;
      });
      pointMode.listening = true;
    }
    pointMode.kind = pointMode.kind === kind ? null : kind;
    const what = kind === 'foreground' ? 'inside the structure where it is missing' : 'where it is wrong';
    notify('info', pointMode.kind ? (kind === 'foreground' ? 'Add point' : 'Remove point') : 'Click correction off',
           pointMode.kind ? `click ${what}; press the button again or Esc to stop` : 'the mouse edits again', 3000);
  }

  const definitions = {
    mraAddPoint() {
      arm('foreground');
    },
    mraRemovePoint() {
      arm('background');
    },
    async mraNextStudy() {
      try {
        const next = await call('POST', `annotate/next/${STRATEGY}`);
        const query = `StudyInstanceUIDs=${next.study}&SeriesInstanceUIDs=${next.series}`;
        window.location.assign(`${window.PUBLIC_URL || '/viewer/'}${MODE_ID}?${query}`);
      } catch (e) {
        notify('error', 'Next study failed', e.message, 15000);
      }
    },
    async mraRunModel() {
      try {
        const { viewportId, displaySet } = current();
        notify('info', 'Run model', `running the model on series ${displaySet.SeriesNumber ?? ''}…`, 3000);
        const answer = await call('POST', `annotate/infer?image=${encodeURIComponent(displaySet.SeriesInstanceUID)}`);
        await showProposal(answer, viewportId, displaySet);
        const names = answer.segments.map(s => s.name).join(', ') || 'no structure';
        notify('success', 'Model proposal', `${answer.model}: ${names}. Correct it, then Save label.`);
      } catch (e) {
        notify('error', 'Run model failed', e.message, 15000);
      }
    },
    async mraSaveLabel() {
      try {
        const { viewportId, displaySet } = current();
        const body = await labelOf(segmentationOf(viewportId, displaySet));
        const series = encodeURIComponent(displaySet.SeriesInstanceUID);
        const answer = await call('PUT', `annotate/label?image=${series}`, JSON.stringify(body));
        const total = Object.values(answer.voxels || {}).reduce((a, b) => a + b, 0);
        notify('success', 'Label saved', `the final label of this series (${total} voxels) is stored in the PACS`);
      } catch (e) {
        notify('error', 'Save label refused', e.message, 30000);
      }
    },
  };
  return { definitions: Object.fromEntries(Object.entries(definitions).map(([k, fn]) => [k, { commandFn: fn }])),
           defaultContext: 'DEFAULT' };
}

const extension = {
  id: 'mrannotator',
  version: '1.0.0',
  getCommandsModule: createCommands,
};

function toolbarButtons() {
  return BUTTONS.map(b => ({
    id: b.id,
    uiType: 'ohif.toolButton',
    props: { icon: b.icon, label: b.label, tooltip: b.label, commands: b.command, evaluate: 'evaluate.action' },
  }));
}

/**
 * Which segment is picked, locked and named is set by the panel's own calls; an update of an existing
 * segmentation through segmentationService.addOrUpdateSegmentation keeps them as they are now.
 *
 * Why (OHIF 3.13.2, measured): after every edit, OHIF's segment statistics handler
 * (setupSegmentationDataModifiedHandler, debounced 1 s) takes the segmentation object, awaits the statistics
 * and writes that object's whole `segments` back through addOrUpdateSegmentation. cornerstone replaces its
 * segmentation state on every update (a panel click calls setActiveSegmentation, which does), so a segment
 * picked while the statistics run was written back as not picked and the one edited before as picked: the
 * next brush stroke painted the structure erased a moment earlier (tests/test_ohif_workflow.py in CI and in 1
 * of 3 local runs: the liver painted where the annotator had picked the spleen). A rename or a lock made in that
 * window was reverted the same way. The upstream method stays reachable as `.upstream` (the test that pins
 * its behaviour: tests/test_ohif_annotate.py::test_a_segment_picked_while_statistics_run_stays_picked).
 */
function keepPanelState(segmentationService) {
  if (segmentationService.addOrUpdateSegmentation.upstream) return;
  const upstream = segmentationService.addOrUpdateSegmentation.bind(segmentationService);
  const guarded = data => {
    const now = data?.segments && segmentationService.getSegmentation(data.segmentationId);
    if (!now) return upstream(data);
    const segments = {};
    for (const [index, segment] of Object.entries(data.segments)) {
      const current = now.segments?.[index];
      segments[index] = segment && current
        ? { ...segment, active: Boolean(current.active), locked: Boolean(current.locked), label: current.label }
        : segment;
    }
    return upstream({ ...data, segments });
  };
  guarded.upstream = upstream;
  segmentationService.addOrUpdateSegmentation = guarded;
}

/** The mode: OHIF's segmentation mode with the five buttons appended to the primary toolbar. */
function deriveMode(segmentationMode) {
  const base = segmentationMode.modeInstance;
  const modeInstance = {
    ...base,
    id: MODE_ID,
    routeName: MODE_ID,
    displayName: 'MRAnnotator',
    onModeEnter(ctx) {
      base.onModeEnter.call(this, ctx);
      const { toolbarService, segmentationService } = ctx.servicesManager.services;
      keepPanelState(segmentationService);
      toolbarService.register(toolbarButtons());
      toolbarService.updateSection('primary', BUTTONS.map(b => b.id));
    },
  };
  return {
    id: MODE_ID,
    modeFactory: () => modeInstance,
    modeInstance,
    // the extension is registered by app-config (an object): a dependency here would be looked up by name
    extensionDependencies: segmentationMode.extensionDependencies,
    customizations: segmentationMode.customizations,
  };
}

/** app-config.js calls this with its plain config and OHIF's appInit context. */
export async function configure(config, { peerImport }) {
  const segmentationMode = await peerImport('@ohif/mode-segmentation');
  return {
    ...config,
    extensions: [...(config.extensions || []), extension],
    modes: [...(config.modes || []), deriveMode(segmentationMode)],
  };
}
